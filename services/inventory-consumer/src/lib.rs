//! inventory-consumer (under construction).
