//! Exact money: amounts are held as integer micro-dollars, never accumulated as binary floats.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Micro-dollars per dollar.
pub const MICROS_PER_USD: u64 = 1_000_000;

/// A non-negative amount of US dollars, stored as integer micro-dollars.
///
/// One hundred calls of `0.01` fill a budget of `1.00` exactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Usd(u64);

/// Why an amount was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MoneyError {
    #[error("amount is not a number (NaN)")]
    NaN,
    #[error("amount must not be negative, got `{0}`")]
    Negative(f64),
    #[error("amount `{0}` is too large")]
    TooLarge(f64),
    #[error("amount must be finite, got `{0}`")]
    Infinite(f64),
}

impl Usd {
    pub const ZERO: Usd = Usd(0);

    pub const fn from_micros(micros: u64) -> Self {
        Usd(micros)
    }

    pub const fn micros(self) -> u64 {
        self.0
    }

    /// Converts a dollar amount, rounding to the nearest micro-dollar.
    pub fn from_f64(value: f64) -> Result<Self, MoneyError> {
        if value.is_nan() {
            return Err(MoneyError::NaN);
        }
        if value.is_infinite() {
            return Err(MoneyError::Infinite(value));
        }
        if value < 0.0 {
            return Err(MoneyError::Negative(value));
        }
        let micros = (value * MICROS_PER_USD as f64).round();
        // 9e15 micro-dollars is nine billion dollars: far above any budget, below f64's exact-integer range.
        if micros > 9.0e15 {
            return Err(MoneyError::TooLarge(value));
        }
        #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "range checked above")]
        Ok(Usd(micros as u64))
    }

    pub fn as_f64(self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "amounts are below 2^53 micro-dollars")]
        let micros = self.0 as f64;
        micros / MICROS_PER_USD as f64
    }

    pub fn saturating_add(self, other: Usd) -> Usd {
        Usd(self.0.saturating_add(other.0))
    }

    pub fn saturating_sub(self, other: Usd) -> Usd {
        Usd(self.0.saturating_sub(other.0))
    }
}

impl fmt::Display for Usd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / MICROS_PER_USD;
        let frac = self.0 % MICROS_PER_USD;
        if frac == 0 {
            write!(f, "${whole}.00")
        } else if frac.is_multiple_of(10_000) {
            write!(f, "${whole}.{:02}", frac / 10_000)
        } else {
            let s = format!("{frac:06}");
            write!(f, "${whole}.{}", s.trim_end_matches('0'))
        }
    }
}

impl Serialize for Usd {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.as_f64())
    }
}

impl<'de> Deserialize<'de> for Usd {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = f64::deserialize(d)?;
        Usd::from_f64(value).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Usd {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Usd".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "number",
            "minimum": 0,
            "description": "US dollars; held exactly as integer micro-dollars"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hundred_cents_fill_a_dollar_exactly() {
        let cent = Usd::from_f64(0.01).unwrap();
        let mut total = Usd::ZERO;
        for _ in 0..100 {
            total = total.saturating_add(cent);
        }
        assert_eq!(total, Usd::from_f64(1.0).unwrap());
    }

    #[test]
    fn rejects_negative_nan_and_infinite() {
        assert_eq!(Usd::from_f64(f64::NAN), Err(MoneyError::NaN));
        assert_eq!(Usd::from_f64(-0.5), Err(MoneyError::Negative(-0.5)));
        assert!(matches!(Usd::from_f64(f64::INFINITY), Err(MoneyError::Infinite(_))));
    }

    #[test]
    fn displays_like_money() {
        assert_eq!(Usd::from_f64(1.5).unwrap().to_string(), "$1.50");
        assert_eq!(Usd::from_f64(0.001).unwrap().to_string(), "$0.001");
        assert_eq!(Usd::from_f64(3.0).unwrap().to_string(), "$3.00");
    }
}
