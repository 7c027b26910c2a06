//! relay (under construction).
