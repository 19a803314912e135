//! The vocabulary Tollgate shares with its callers: service names, method groups and roles
//! exactly as the account API spells them. Parsing and printing live here so that config,
//! quotas, the store and the API agree on one spelling.

use std::fmt;
use std::str::FromStr;

macro_rules! api_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => stringify!($variant)),+ }
            }

            /// A small stable number, used in compact store keys.
            pub fn code(self) -> u8 {
                self as u8
            }

            pub fn from_code(code: u8) -> Option<Self> {
                Self::ALL.get(code as usize).copied()
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $(stringify!($variant) => Ok($name::$variant),)+
                    _ => Err(format!(
                        "must be one of {}",
                        Self::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", ")
                    )),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

api_enum!(
    /// The computation services Tollgate can front (`ServiceName` in the API).
    ServiceName {
        UNIVERSAL, ROUTING, ACCOUNT, ADMIN, STUDIO, MONITOR, PACKER, AGRO, STOCK, LONGHAUL,
        CLUSTER, CARGOTIMETABLE,
    }
);

api_enum!(
    /// The method groups quotas and statistics are kept by (`MethodGroup` in the API).
    MethodGroup {
        NOTRACE, TRACE, PLAN, ACTUALIZE, REFINE, CONVERT, ANALYTICS, PREDICT, VALIDATE, ROUTE,
        MATRIX, PACK,
    }
);

api_enum!(
    /// What a user may do: ADMIN sees everything, PARTNER its company, USER and BOT themselves.
    Role { ADMIN, PARTNER, USER, BOT }
);

/// Whether two role lists grant the same roles, in whatever order.
pub fn same_roles(a: &[Role], b: &[Role]) -> bool {
    a.len() == b.len() && a.iter().all(|r| b.contains(r))
}

/// `\w+` as the API means it: ASCII letters, digits and underscore.
pub fn is_word(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Whether a username or company key is the one Tollgate records for calls made without a
/// token ([`crate::trace::ANONYMOUS`]). No account or company may take it: its users would be
/// shown those calls' audit records and captured data as their own.
pub fn is_reserved_name(s: &str) -> bool {
    s == crate::trace::ANONYMOUS
}

pub const RESERVED_NAME_RULE: &str = "'anonymous' is reserved for calls made without a token";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_text_and_codes() {
        for s in ServiceName::ALL {
            assert_eq!(s.as_str().parse::<ServiceName>().unwrap(), *s);
            assert_eq!(ServiceName::from_code(s.code()), Some(*s));
        }
        assert!("universal".parse::<ServiceName>().is_err());
        assert_eq!("PLAN".parse::<MethodGroup>().unwrap(), MethodGroup::PLAN);
        assert!("ROOT".parse::<Role>().unwrap_err().contains("ADMIN"));
    }

    #[test]
    fn words_are_ascii_letters_digits_underscore() {
        assert!(is_word("acme_2"));
        assert!(!is_word(""));
        assert!(!is_word("a-b"));
        assert!(!is_word("a b"));
    }
}
