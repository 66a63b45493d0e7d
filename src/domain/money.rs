//! Exact money. One credit is one US dollar; the ledger counts whole cents in an
//! `i64`, so no amount is ever rounded and no float is ever involved.

use std::fmt;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Neg, Sub, SubAssign};
use std::str::FromStr;

use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An amount of credits, in cents. Signed, because journal entries move
/// credits in and out of lots; every balance the ledger keeps is checked to be
/// non-negative where it is stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Credits(i64);

/// Why a number could not be read as an amount of credits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("`{0}` is not a decimal number")]
    NotANumber(String),
    #[error("`{0}` has more than two decimals")]
    TooPrecise(String),
    #[error("{0} is outside {1} … {2}")]
    OutOfRange(String, Credits, Credits),
}

impl Credits {
    pub const ZERO: Credits = Credits(0);

    pub const fn from_cents(cents: i64) -> Self {
        Credits(cents)
    }

    pub const fn cents(self) -> i64 {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    pub fn is_positive(self) -> bool {
        self.0 > 0
    }

    pub fn min(self, other: Credits) -> Credits {
        Credits(self.0.min(other.0))
    }

    /// The exact decimal value, for reports and for the edges of the system.
    pub fn to_decimal(self) -> Decimal {
        Decimal::new(self.0, 2)
    }

    /// Reads an exact decimal with at most two decimals.
    pub fn from_decimal(value: Decimal) -> Result<Self, AmountError> {
        let normalized = value.normalize();
        if normalized.scale() > 2 {
            return Err(AmountError::TooPrecise(value.to_string()));
        }
        let cents = normalized
            .checked_mul(Decimal::ONE_HUNDRED)
            .and_then(|cents| cents.to_i64())
            .ok_or_else(|| AmountError::NotANumber(value.to_string()))?;
        Ok(Credits(cents))
    }

    /// Reads an amount and checks it lies within `min ..= max`.
    pub fn parse_within(text: &str, min: Credits, max: Credits) -> Result<Self, AmountError> {
        let amount: Credits = text.parse()?;
        if amount < min || amount > max {
            return Err(AmountError::OutOfRange(text.to_owned(), min, max));
        }
        Ok(amount)
    }
}

impl FromStr for Credits {
    type Err = AmountError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let trimmed = text.trim();
        // `Decimal::from_str` accepts forms an integrator would not mean as an
        // amount (`_` separators, exponents); only plain decimals pass.
        if trimmed.is_empty()
            || !trimmed
                .chars()
                .enumerate()
                .all(|(i, c)| c.is_ascii_digit() || c == '.' || (i == 0 && c == '-'))
        {
            return Err(AmountError::NotANumber(text.to_owned()));
        }
        let value =
            Decimal::from_str(trimmed).map_err(|_| AmountError::NotANumber(text.to_owned()))?;
        Credits::from_decimal(value)
    }
}

impl fmt::Display for Credits {
    /// Two decimals, always: `20.00`, `-0.50`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:02}", abs / 100, abs % 100)
    }
}

impl Serialize for Credits {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Credits {
    /// Accepts a string (`"19.50"`) or a plain JSON number (`19.5`), as the
    /// contract allows; a number is read through its shortest decimal form so
    /// that `0.1` means exactly ten cents.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Number(serde_json::Number),
        }
        let text = match Raw::deserialize(deserializer)? {
            Raw::Text(text) => text,
            Raw::Number(number) => number.to_string(),
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Add for Credits {
    type Output = Credits;
    fn add(self, rhs: Credits) -> Credits {
        Credits(self.0 + rhs.0)
    }
}

impl Sub for Credits {
    type Output = Credits;
    fn sub(self, rhs: Credits) -> Credits {
        Credits(self.0 - rhs.0)
    }
}

impl Neg for Credits {
    type Output = Credits;
    fn neg(self) -> Credits {
        Credits(-self.0)
    }
}

impl AddAssign for Credits {
    fn add_assign(&mut self, rhs: Credits) {
        self.0 += rhs.0;
    }
}

impl SubAssign for Credits {
    fn sub_assign(&mut self, rhs: Credits) {
        self.0 -= rhs.0;
    }
}

impl Sum for Credits {
    fn sum<I: Iterator<Item = Credits>>(iter: I) -> Credits {
        iter.fold(Credits::ZERO, Add::add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_with_up_to_two_decimals_are_exact() {
        assert_eq!("20".parse::<Credits>().unwrap(), Credits::from_cents(2000));
        assert_eq!(
            "19.50".parse::<Credits>().unwrap(),
            Credits::from_cents(1950)
        );
        assert_eq!("0.1".parse::<Credits>().unwrap(), Credits::from_cents(10));
        assert_eq!("0.01".parse::<Credits>().unwrap(), Credits::from_cents(1));
        assert_eq!(
            "1.230".parse::<Credits>().unwrap(),
            Credits::from_cents(123)
        );
    }

    #[test]
    fn more_than_two_decimals_or_odd_forms_are_refused() {
        assert!(matches!(
            "1.234".parse::<Credits>(),
            Err(AmountError::TooPrecise(_))
        ));
        for bad in ["", "1e3", "1_000", "abc", "1.2.3", "+1", " "] {
            assert!(bad.parse::<Credits>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn json_numbers_are_read_through_their_decimal_form() {
        let c: Credits = serde_json::from_str("19.5").unwrap();
        assert_eq!(c, Credits::from_cents(1950));
        let c: Credits = serde_json::from_str("0.1").unwrap();
        assert_eq!(c, Credits::from_cents(10));
        assert!(serde_json::from_str::<Credits>("0.001").is_err());
    }

    #[test]
    fn display_always_has_two_decimals() {
        assert_eq!(Credits::from_cents(2000).to_string(), "20.00");
        assert_eq!(Credits::from_cents(5).to_string(), "0.05");
        assert_eq!(Credits::from_cents(-50).to_string(), "-0.50");
        assert_eq!(Credits::from_cents(2000).to_decimal().to_string(), "20.00");
    }

    #[test]
    fn ranges_are_checked() {
        let min = Credits::from_cents(1);
        let max = Credits::from_cents(100);
        assert!(Credits::parse_within("0", min, max).is_err());
        assert!(Credits::parse_within("1.01", min, max).is_err());
        assert!(Credits::parse_within("1", min, max).is_ok());
    }
}
