use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::types::{Cents, CustomerId, OrderId, Quantity, Sku, ValidationError};

/// One line of an order, as the API accepts and returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LineItem {
    #[schema(value_type = String, pattern = "^[A-Z0-9][A-Z0-9-]{0,31}$", example = "SKU-1")]
    pub sku: Sku,
    #[schema(value_type = i64, minimum = 1, maximum = 1000, example = 2)]
    pub quantity: Quantity,
    #[schema(value_type = i64, minimum = 0, maximum = 1_000_000_000, example = 1250)]
    pub unit_price_cents: Cents,
}

/// A validated request to create an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    pub customer_id: CustomerId,
    pub items: Vec<LineItem>,
}

impl NewOrder {
    pub const MAX_ITEMS: usize = 100;

    /// Validates raw input, naming the first field that breaks a rule (`items[3].sku`).
    pub fn parse(customer_id: &str, items: &[(String, i64, i64)]) -> Result<Self, ValidationError> {
        let customer_id = CustomerId::parse_new(customer_id)?;
        if items.is_empty() || items.len() > Self::MAX_ITEMS {
            return Err(ValidationError::new("items", "must hold 1 to 100 items"));
        }
        let items = items
            .iter()
            .enumerate()
            .map(|(i, (sku, quantity, price))| {
                let item = || -> Result<LineItem, ValidationError> {
                    Ok(LineItem {
                        sku: Sku::parse(sku.as_str())?,
                        quantity: Quantity::parse(*quantity)?,
                        unit_price_cents: Cents::unit_price(*price)?,
                    })
                };
                item().map_err(|e| e.within(&format!("items[{i}]")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { customer_id, items })
    }

    /// Sum of quantity × unit price. Bounded by the rules at 10^14, so it cannot overflow.
    pub fn total_cents(&self) -> i64 {
        total_cents(&self.items)
    }
}

pub(crate) fn total_cents(items: &[LineItem]) -> i64 {
    items.iter().map(|i| i.quantity.get() * i.unit_price_cents.get()).sum()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    Pending,
    Confirmed,
    Cancelled,
}

impl OrderStatus {
    pub const ALL: [Self; 3] = [Self::Pending, Self::Confirmed, Self::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Confirmed => "CONFIRMED",
            Self::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "PENDING" => Some(Self::Pending),
            "CONFIRMED" => Some(Self::Confirmed),
            "CANCELLED" => Some(Self::Cancelled),
            _ => None,
        }
    }

    /// The state machine: PENDING → CONFIRMED, PENDING → CANCELLED, CONFIRMED → CANCELLED.
    ///
    /// `Ok(Some(next))` is a change that must write its event; `Ok(None)` means the order is
    /// already where the transition leads, so a retried request changes nothing.
    pub fn apply(self, transition: Transition) -> Result<Option<Self>, TransitionError> {
        use OrderStatus::*;
        match (self, transition) {
            (Pending, Transition::Confirm) => Ok(Some(Confirmed)),
            (Confirmed, Transition::Confirm) => Ok(None),
            (Cancelled, Transition::Confirm) => Err(TransitionError { from: self, transition }),
            (Pending | Confirmed, Transition::Cancel) => Ok(Some(Cancelled)),
            (Cancelled, Transition::Cancel) => Ok(None),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Confirm,
    Cancel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot {transition:?} an order that is {}", from.as_str())]
pub struct TransitionError {
    pub from: OrderStatus,
    pub transition: Transition,
}

/// An order as stored and as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Order {
    /// A ULID.
    #[schema(value_type = String, pattern = "^[0-9A-HJKMNP-TV-Z]{26}$", example = "01JF3M2Z8Q4W1G5B6N7C8D9E0F")]
    pub id: OrderId,
    #[schema(value_type = String, min_length = 1, max_length = 64, example = "c-1")]
    pub customer_id: CustomerId,
    pub status: OrderStatus,
    pub items: Vec<LineItem>,
    pub total_cents: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Order {
    /// A new PENDING order created at `now`.
    pub fn create(new: NewOrder, now: DateTime<Utc>) -> Self {
        let total_cents = new.total_cents();
        Self {
            id: OrderId::new(),
            customer_id: new.customer_id,
            status: OrderStatus::Pending,
            items: new.items,
            total_cents,
            created_at: now,
            updated_at: now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(sku: &str, q: i64, p: i64) -> (String, i64, i64) {
        (sku.to_owned(), q, p)
    }

    #[test]
    fn parse_names_the_failing_field() {
        let err = NewOrder::parse("c-1", &[item("A", 1, 1), item("bad", 1, 1)]).unwrap_err();
        assert_eq!(err.field, "items[1].sku");
        let err = NewOrder::parse("c-1", &[item("A", 0, 1)]).unwrap_err();
        assert_eq!(err.field, "items[0].quantity");
        let err = NewOrder::parse("c-1", &[item("A", 1, -5)]).unwrap_err();
        assert_eq!(err.field, "items[0].unit_price_cents");
        assert_eq!(NewOrder::parse("c-1", &[]).unwrap_err().field, "items");
        assert_eq!(NewOrder::parse("", &[item("A", 1, 1)]).unwrap_err().field, "customer_id");
        let many: Vec<_> = (0..101).map(|_| item("A", 1, 1)).collect();
        assert_eq!(NewOrder::parse("c", &many).unwrap_err().field, "items");
    }

    #[test]
    fn total_is_the_sum_of_lines() {
        let order = NewOrder::parse("c", &[item("A", 2, 1250), item("B", 3, 100)]).unwrap();
        assert_eq!(order.total_cents(), 2800);
        let max: Vec<_> = (0..100).map(|_| item("A", 1000, 1_000_000_000)).collect();
        assert_eq!(NewOrder::parse("c", &max).unwrap().total_cents(), 100_000_000_000_000);
    }

    #[test]
    fn state_machine() {
        use OrderStatus::*;
        use Transition::*;
        assert_eq!(Pending.apply(Confirm), Ok(Some(Confirmed)));
        assert_eq!(Pending.apply(Cancel), Ok(Some(Cancelled)));
        assert_eq!(Confirmed.apply(Cancel), Ok(Some(Cancelled)));
        assert_eq!(Confirmed.apply(Confirm), Ok(None));
        assert_eq!(Cancelled.apply(Cancel), Ok(None));
        assert!(Cancelled.apply(Confirm).is_err());
        for s in [Pending, Confirmed, Cancelled] {
            assert_eq!(OrderStatus::parse(s.as_str()), Some(s));
        }
    }
}
