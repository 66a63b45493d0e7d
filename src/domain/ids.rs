//! Names the ledger trusts: identifiers, email addresses and redemption codes.
//! Each can only be built valid, so the rules below never re-check them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("identifier `{0}` must be 1–128 characters of A-Z a-z 0-9 . _ : -")]
    Identifier(String),
    #[error("`{0}` is not a valid email address")]
    Email(String),
    #[error("code `{0}` must have 4–128 letters or digits, spaces and dashes aside")]
    Code(String),
}

fn deserialize_parsed<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = NameError>,
{
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(serde::de::Error::custom)
}

macro_rules! string_newtype {
    ($name:ident) => {
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                deserialize_parsed(deserializer)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

/// An external identifier: account, purchase, request, learner, item, group.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Id(String);
string_newtype!(Id);

impl FromStr for Id {
    type Err = NameError;

    fn from_str(text: &str) -> Result<Self, NameError> {
        let valid = (1..=128).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        if valid {
            Ok(Id(text.to_owned()))
        } else {
            Err(NameError::Identifier(text.to_owned()))
        }
    }
}

/// An email address, kept in lower case: one person, one identity, whatever
/// capitals a portal happened to send.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Email(String);
string_newtype!(Email);

impl FromStr for Email {
    type Err = NameError;

    fn from_str(text: &str) -> Result<Self, NameError> {
        let lowered = text.trim().to_lowercase();
        // lettre's parser is the one that will later put the address on the
        // wire, so an address it accepts is one we can send to.
        match lowered.parse::<lettre::Address>() {
            Ok(_) if lowered.len() <= 254 => Ok(Email(lowered)),
            _ => Err(NameError::Email(text.to_owned())),
        }
    }
}

/// A redemption code as the owner sees it (`K7QM-2X9P-…`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Code(String);
string_newtype!(Code);

/// The form codes are compared in: upper case, spaces and dashes removed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CodeKey(String);

impl CodeKey {
    pub fn of(text: &str) -> CodeKey {
        CodeKey(
            text.chars()
                .filter(|c| !matches!(c, ' ' | '-'))
                .map(|c| c.to_ascii_uppercase())
                .collect(),
        )
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Code {
    /// Crockford's base-32 alphabet: no I, L, O or U to misread.
    const ALPHABET: &'static [u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

    /// A fresh code from 80 random bits: sixteen base-32 characters in four
    /// groups, easy to read aloud and to type.
    pub fn generate() -> Code {
        use rand::RngExt;
        let bits: u128 = u128::from_le_bytes({
            let mut bytes = [0_u8; 16];
            bytes[..10].copy_from_slice(&rand::rng().random::<[u8; 10]>());
            bytes
        });
        let chars: Vec<u8> = (0..16)
            .map(|i| Self::ALPHABET[((bits >> (5 * i)) & 31) as usize])
            .collect();
        let groups: Vec<&str> = chars
            .chunks(4)
            .map(|g| std::str::from_utf8(g).expect("the alphabet is ASCII"))
            .collect();
        Code(groups.join("-"))
    }

    pub fn key(&self) -> CodeKey {
        CodeKey::of(&self.0)
    }
}

impl FromStr for Code {
    type Err = NameError;

    fn from_str(text: &str) -> Result<Self, NameError> {
        let key = CodeKey::of(text);
        let valid = text.len() <= 128
            && key.0.len() >= 4
            && text.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b' ' | b'.' | b'_' | b':' | b'-')
            });
        if valid {
            Ok(Code(text.trim().to_owned()))
        } else {
            Err(NameError::Code(text.to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_allow_only_the_contract_alphabet() {
        assert!("acct-1.a_b:c".parse::<Id>().is_ok());
        assert!("".parse::<Id>().is_err());
        assert!("a b".parse::<Id>().is_err());
        assert!("x".repeat(129).parse::<Id>().is_err());
        assert!("'; DROP TABLE".parse::<Id>().is_err());
    }

    #[test]
    fn emails_are_validated_and_lower_cased() {
        assert_eq!(
            "Ann@Example.COM".parse::<Email>().unwrap().as_str(),
            "ann@example.com"
        );
        assert!("not-an-email".parse::<Email>().is_err());
        assert!("a@b\r\nBcc: x@y".parse::<Email>().is_err());
    }

    #[test]
    fn codes_match_without_regard_to_case_spaces_or_dashes() {
        let code: Code = "ab12-cd34".parse().unwrap();
        assert_eq!(code.key(), CodeKey::of("AB12 CD34"));
        assert_eq!(code.key(), CodeKey::of("ab12cd34"));
        assert_ne!(code.key(), CodeKey::of("ab12cd35"));
    }

    #[test]
    fn generated_codes_are_sixteen_base32_characters_and_differ() {
        let a = Code::generate();
        let b = Code::generate();
        assert_ne!(a, b);
        assert_eq!(a.key().as_str().len(), 16);
        assert!(a.as_str().parse::<Code>().is_ok());
    }
}
