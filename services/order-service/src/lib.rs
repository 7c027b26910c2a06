//! order-service (under construction).
