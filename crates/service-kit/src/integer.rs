//! Integers in request bodies as JSON Schema reads them: `2` and `2.0` are both the integer 2
//! (a number with no fractional part), `2.5` is not one. Clients that build JSON from floating
//! point numbers send the second form; refusing it would refuse what the documents allow.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, Unexpected, Visitor};

/// Largest magnitude a float holds exactly: beyond it `x.0` may not be the integer meant.
const EXACT_IN_F64: f64 = 9_007_199_254_740_992.0;

/// `value` as an integer, if it is one (see the module).
pub fn from_json(value: &serde_json::Value) -> Option<i64> {
    value.as_i64().or_else(|| value.as_f64().and_then(from_f64))
}

fn from_f64(v: f64) -> Option<i64> {
    (v.fract() == 0.0 && v.abs() <= EXACT_IN_F64).then_some(v as i64)
}

/// A field that must be an integer (see the module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Integer(pub i64);

impl<'de> Deserialize<'de> for Integer {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Expect;
        impl Visitor<'_> for Expect {
            type Value = Integer;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Integer, E> {
                Ok(Integer(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Integer, E> {
                i64::try_from(v).map(Integer).map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Integer, E> {
                from_f64(v).map(Integer).ok_or_else(|| E::invalid_value(Unexpected::Float(v), &self))
            }
        }
        deserializer.deserialize_any(Expect)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn integral_numbers_are_integers_and_others_are_not() {
        for (value, expected) in [
            (json!(2), Some(2)),
            (json!(-3), Some(-3)),
            (json!(2.0), Some(2)),
            (json!(0.0), Some(0)),
            (json!(1e3), Some(1000)),
            (json!(2.5), None),
            (json!(1e300), None),
            (json!(u64::MAX), None),
            (json!("2"), None),
            (json!(null), None),
        ] {
            assert_eq!(from_json(&value), expected, "{value}");
            let parsed = serde_json::from_value::<Integer>(value.clone()).ok().map(|i| i.0);
            assert_eq!(parsed, expected, "{value} as Integer");
        }
    }
}
