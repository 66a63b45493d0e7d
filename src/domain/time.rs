//! Instants. The ledger keeps microseconds in UTC, the precision both
//! databases store exactly, so what is written is what is read back.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Duration, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ts(DateTime<Utc>);

impl Ts {
    pub fn now() -> Ts {
        Ts::from(Utc::now())
    }

    pub fn from_micros(micros: i64) -> Option<Ts> {
        DateTime::from_timestamp_micros(micros).map(Ts)
    }

    pub fn micros(self) -> i64 {
        self.0.timestamp_micros()
    }

    /// Seconds since the Unix epoch, as Prometheus gives times.
    pub fn unix_seconds(self) -> f64 {
        self.0.timestamp_micros() as f64 / 1e6
    }

    pub fn utc(self) -> DateTime<Utc> {
        self.0
    }

    pub fn parse(text: &str) -> Result<Ts, chrono::ParseError> {
        DateTime::parse_from_rfc3339(text).map(|t| Ts::from(t.with_timezone(&Utc)))
    }

    /// `YYYY-MM-DD`, as emails show dates.
    pub fn date(self) -> String {
        self.0.format("%Y-%m-%d").to_string()
    }

    pub fn plus_days(self, days: i64) -> Ts {
        Ts(self.0 + Duration::days(days))
    }

    pub fn plus(self, duration: Duration) -> Ts {
        Ts(self.0 + duration)
    }

    /// One calendar year later (29 February becomes 28 February).
    pub fn plus_one_year(self) -> Ts {
        self.0
            .checked_add_months(chrono::Months::new(12))
            .map_or(self, Ts)
    }

    /// Whole days from `self` to `later`, rounded down.
    pub fn whole_days_until(self, later: Ts) -> i64 {
        (later.0 - self.0).num_days()
    }

    /// Whether RFC 3339 can write this instant: its UTC year has four
    /// digits. Outside them chrono writes `+10000-…`, which no consumer of
    /// an outbound event could read.
    pub fn is_rfc3339(self) -> bool {
        (0..=9999).contains(&self.0.year())
    }

    /// The first instant RFC 3339 can write and the first after the last
    /// one: every instant the ledger keeps lies in `[start, end)`.
    pub fn rfc3339_span() -> (Ts, Ts) {
        let year = |y| {
            chrono::NaiveDate::from_ymd_opt(y, 1, 1)
                .and_then(|d| d.and_hms_opt(0, 0, 0))
                .map(|t| Ts::from(t.and_utc()))
                .expect("years 0 and 10000 are instants")
        };
        (year(0), year(10_000))
    }
}

impl From<DateTime<Utc>> for Ts {
    fn from(t: DateTime<Utc>) -> Ts {
        Ts::from_micros(t.timestamp_micros()).expect("a chrono instant fits in microseconds")
    }
}

/// What a command-line argument is parsed with, so `--at`, `--from` and
/// `--to` are checked by the argument parser like any other argument.
impl FromStr for Ts {
    type Err = chrono::ParseError;

    fn from_str(text: &str) -> Result<Ts, chrono::ParseError> {
        Ts::parse(text)
    }
}

impl fmt::Display for Ts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }
}

impl Serialize for Ts {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ts {
    /// RFC 3339 with an offset, as the contract requires.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let ts =
            Ts::parse(&text).map_err(|e| serde::de::Error::custom(format!("`{text}`: {e}")))?;
        if !ts.is_rfc3339() {
            return Err(serde::de::Error::custom(format!(
                "`{text}` is outside the years 0000 to 9999 in UTC"
            )));
        }
        Ok(ts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_need_an_offset_and_keep_microseconds() {
        let t = Ts::parse("2026-11-21T10:00:00.1234567+01:00").unwrap();
        assert_eq!(t.to_string(), "2026-11-21T09:00:00.123456Z");
        assert!(Ts::parse("2026-11-21T10:00:00").is_err());
        assert_eq!(Ts::from_micros(t.micros()), Some(t));
    }

    #[test]
    fn whole_days_round_down() {
        let a = Ts::parse("2026-01-01T00:00:00Z").unwrap();
        let b = Ts::parse("2026-01-08T23:59:59Z").unwrap();
        assert_eq!(a.whole_days_until(b), 7);
        assert_eq!(a.date(), "2026-01-01");
    }
}
