use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use ulid::Ulid;

/// A rule of the contract that an input broke, naming the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// JSON path of the field, e.g. `items[2].sku`.
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }

    /// The same error, reported under `prefix` (e.g. `items[3]`).
    pub fn within(self, prefix: &str) -> Self {
        let field = if self.field.is_empty() { prefix.to_owned() } else { format!("{prefix}.{}", self.field) };
        Self { field, ..self }
    }
}

/// An order's identity: a ULID, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrderId(Ulid);

impl OrderId {
    pub fn new() -> Self {
        Self(Ulid::new())
    }
}

impl Default for OrderId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for OrderId {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ulid::from_string(s).map(Self).map_err(|_| ValidationError::new("id", "not a valid order id (ULID)"))
    }
}

/// `customer_id`: 1..=64 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CustomerId(String);

impl CustomerId {
    pub const MAX_CHARS: usize = 64;

    pub fn parse(s: impl Into<String>) -> Result<Self, ValidationError> {
        let s = s.into();
        let n = s.chars().count();
        if n == 0 || n > Self::MAX_CHARS {
            return Err(ValidationError::new("customer_id", "must be 1 to 64 characters"));
        }
        Ok(Self(s))
    }

    /// [`CustomerId::parse`] for new input, which may not carry control characters (NUL,
    /// line breaks, escapes): they cannot be stored (NUL) or would reach logs and screens raw.
    /// Ids already stored or published are read with [`CustomerId::parse`], which accepts what
    /// earlier versions let in.
    pub fn parse_new(s: &str) -> Result<Self, ValidationError> {
        if s.chars().any(char::is_control) {
            return Err(ValidationError::new("customer_id", "must not contain control characters"));
        }
        Self::parse(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for CustomerId {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl From<CustomerId> for String {
    fn from(c: CustomerId) -> Self {
        c.0
    }
}

/// A tenant: `[a-z0-9][a-z0-9-]{0,63}`. Every order, event and stock row belongs to one, and
/// no tenant sees another's. The pattern keeps it safe to write into a statement as a literal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TenantId(String);

impl TenantId {
    pub const MAX_LEN: usize = 64;
    /// The tenant of every request when authentication is off, and of rows written before
    /// there were tenants.
    pub const DEFAULT: &'static str = "default";

    pub fn parse(s: impl Into<String>) -> Result<Self, ValidationError> {
        let s = s.into();
        let mut bytes = s.bytes();
        let first_ok = bytes.next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let rest_ok = bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !first_ok || !rest_ok || s.len() > Self::MAX_LEN {
            return Err(ValidationError::new("tenant_id", "must match [a-z0-9][a-z0-9-]{0,63}"));
        }
        Ok(Self(s))
    }

    /// The tenant `default`.
    pub fn default_tenant() -> Self {
        Self(Self::DEFAULT.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for TenantId {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl From<TenantId> for String {
    fn from(t: TenantId) -> Self {
        t.0
    }
}

/// A stock-keeping unit: `[A-Z0-9][A-Z0-9-]{0,31}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sku(String);

impl Sku {
    pub const MAX_LEN: usize = 32;

    pub fn parse(s: impl Into<String>) -> Result<Self, ValidationError> {
        let s = s.into();
        let mut bytes = s.bytes();
        let first_ok = bytes.next().is_some_and(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
        let rest_ok = bytes.all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-');
        if !first_ok || !rest_ok || s.len() > Self::MAX_LEN {
            return Err(ValidationError::new("sku", "must match [A-Z0-9][A-Z0-9-]{0,31}"));
        }
        Ok(Self(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Sku {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Sku {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl From<Sku> for String {
    fn from(s: Sku) -> Self {
        s.0
    }
}

/// Units of one line item: 1..=1000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct Quantity(u16);

impl Quantity {
    pub const MAX: i64 = 1000;

    pub fn parse(n: i64) -> Result<Self, ValidationError> {
        match u16::try_from(n) {
            Ok(q) if (1..=Self::MAX).contains(&n) => Ok(Self(q)),
            _ => Err(ValidationError::new("quantity", "must be between 1 and 1000")),
        }
    }

    pub fn get(self) -> i64 {
        i64::from(self.0)
    }
}

impl TryFrom<i64> for Quantity {
    type Error = ValidationError;
    fn try_from(n: i64) -> Result<Self, Self::Error> {
        Self::parse(n)
    }
}

impl From<Quantity> for i64 {
    fn from(q: Quantity) -> Self {
        q.get()
    }
}

/// A unit price in cents: 0..=1_000_000_000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct Cents(i64);

impl Cents {
    pub const MAX_UNIT_PRICE: i64 = 1_000_000_000;

    pub fn unit_price(n: i64) -> Result<Self, ValidationError> {
        if (0..=Self::MAX_UNIT_PRICE).contains(&n) {
            Ok(Self(n))
        } else {
            Err(ValidationError::new("unit_price_cents", "must be between 0 and 1000000000"))
        }
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl TryFrom<i64> for Cents {
    type Error = ValidationError;
    fn try_from(n: i64) -> Result<Self, Self::Error> {
        Self::unit_price(n)
    }
}

impl From<Cents> for i64 {
    fn from(c: Cents) -> Self {
        c.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_rules() {
        let longest = "a".repeat(64);
        for ok in ["default", "t-1", "0", "a-", longest.as_str()] {
            assert!(TenantId::parse(ok).is_ok(), "{ok}");
        }
        let too_long = "a".repeat(65);
        for bad in ["", "-a", "T-1", "t_1", "t 1", "t'1", "té", too_long.as_str()] {
            assert_eq!(TenantId::parse(bad).map_err(|e| e.field), Err("tenant_id".to_owned()), "{bad}");
        }
    }

    #[test]
    fn sku_rules() {
        for ok in ["A", "SKU-1", "0", "A-", "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"] {
            assert!(Sku::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-A", "a", "SKU_1", "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456", "É"] {
            assert_eq!(Sku::parse(bad).unwrap_err().field, "sku", "{bad}");
        }
    }

    #[test]
    fn customer_id_counts_characters_not_bytes() {
        assert!(CustomerId::parse("é".repeat(64)).is_ok());
        assert!(CustomerId::parse("é".repeat(65)).is_err());
        assert!(CustomerId::parse("").is_err());
    }

    #[test]
    fn new_customer_ids_refuse_control_characters_and_stored_ones_are_still_read() {
        for bad in ["c\u{0}1", "c\n1", "\t", "c\u{1b}[31m", "c\u{7f}", "c\u{85}"] {
            let e = CustomerId::parse_new(bad).unwrap_err();
            assert_eq!((e.field.as_str(), e.message.as_str()), ("customer_id", "must not contain control characters"));
        }
        assert!(CustomerId::parse_new("c 1 é ✓").is_ok());
        assert!(CustomerId::parse_new("").is_err());
        assert!(CustomerId::parse("c\t1").is_ok(), "ids stored before the rule still decode");
    }

    #[test]
    fn numeric_bounds() {
        assert!(Quantity::parse(0).is_err());
        assert!(Quantity::parse(1).is_ok());
        assert!(Quantity::parse(1000).is_ok());
        assert!(Quantity::parse(1001).is_err());
        assert!(Quantity::parse(-1).is_err());
        assert!(Cents::unit_price(-1).is_err());
        assert!(Cents::unit_price(0).is_ok());
        assert!(Cents::unit_price(1_000_000_000).is_ok());
        assert!(Cents::unit_price(1_000_000_001).is_err());
    }

    #[test]
    fn order_id_round_trips() {
        let id = OrderId::new();
        assert_eq!(id.to_string().parse::<OrderId>().unwrap(), id);
        assert!("nope".parse::<OrderId>().is_err());
    }
}
