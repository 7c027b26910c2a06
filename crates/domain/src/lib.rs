//! The orders domain, free of I/O.
//!
//! Validated newtypes ([`Sku`], [`CustomerId`], [`Quantity`], [`Cents`]), the order state
//! machine ([`OrderStatus`]), the events an order emits ([`EventPayload`]) and the encoding of
//! an event as a Redis stream entry ([`StreamEntry`]), exactly as the public contract lists it.

mod event;
mod order;
pub mod partition;
mod stream;
mod types;

pub use event::{Event, EventPayload, EventType, OrderCancelled, OrderConfirmed, OrderCreated};
pub use order::{LineItem, NewOrder, Order, OrderStatus, Transition, TransitionError};
pub use partition::Partitions;
pub use stream::{entry_id_key, fields, DecodeError, StreamEntry};
pub use types::{Cents, CustomerId, OrderId, Quantity, Sku, TenantId, ValidationError};

/// The `aggregate_type` of every order event.
pub const AGGREGATE_TYPE: &str = "order";
