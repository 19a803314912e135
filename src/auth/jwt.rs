//! Tollgate's own tokens: HS256 only (the algorithm is pinned: a token naming another, or
//! none, is invalid), a `kid` naming the key so keys can rotate (the newest signs, all listed
//! verify), exact expiry with no leeway, and a token version that a password change bumps.
//! A verified token is remembered, so the calls after its first are checked by a lookup and
//! its expiry, not by decoding and a signature again.

use std::collections::HashMap;
use std::sync::Arc;

use jsonwebtoken::{
    decode, decode_header, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation,
};
use serde::{Deserialize, Serialize};

use crate::model::Role;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Username.
    pub sub: String,
    /// Company key.
    pub company: String,
    pub roles: Vec<Role>,
    /// The user's token version when issued.
    pub ver: u32,
    pub iat: u64,
    pub exp: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    Malformed,
    WrongAlgorithm,
    UnknownKey,
    BadSignature,
    Expired,
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenError::Malformed => "token is malformed",
            TokenError::WrongAlgorithm => "token algorithm is not HS256",
            TokenError::UnknownKey => "token key is unknown",
            TokenError::BadSignature => "token signature is invalid",
            TokenError::Expired => "token has expired",
        })
    }
}

/// The signing key and every key still accepted for verification, each named by its kid.
pub struct Keys {
    signing_kid: String,
    signing: EncodingKey,
    verifying: HashMap<String, DecodingKey>,
    validation: Validation,
    /// Tokens whose signature verified, with their claims. Keyed by the whole token, so only
    /// the exact bytes that verified are found; bounded, and a token pushed out is verified in
    /// full again.
    verified: quick_cache::sync::Cache<Box<str>, Arc<Claims>>,
}

/// Tokens remembered as verified: the tokens in use by this many callers at once each cost one
/// decoding and signature check per process, not one per call.
const VERIFIED_TOKENS: usize = 16_384;

/// A short, stable name for a secret that does not reveal it.
fn kid_of(secret: &[u8]) -> String {
    use std::hash::{Hash, Hasher};
    // Not a security boundary: the kid only picks which key to try.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b"tollgate-kid".hash(&mut h);
    secret.hash(&mut h);
    format!("k{:012x}", h.finish() & 0xffff_ffff_ffff)
}

impl Keys {
    /// `current` signs; `previous` keep verifying tokens issued before a rotation.
    pub fn new(current: &[u8], previous: &[Vec<u8>]) -> Keys {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let mut verifying = HashMap::new();
        for secret in previous.iter().map(Vec::as_slice).chain([current]) {
            verifying.insert(kid_of(secret), DecodingKey::from_secret(secret));
        }
        Keys {
            signing_kid: kid_of(current),
            signing: EncodingKey::from_secret(current),
            verifying,
            validation,
            verified: quick_cache::sync::Cache::new(VERIFIED_TOKENS),
        }
    }

    pub fn issue(&self, claims: &Claims) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.signing_kid.clone());
        encode(&header, claims, &self.signing).expect("HS256 signing cannot fail")
    }

    /// Verifies signature, algorithm and expiry (no leeway: a token is valid before the instant
    /// `exp` names and invalid from it on, as RFC 7519 has it).
    pub fn verify(&self, token: &str) -> Result<Arc<Claims>, TokenError> {
        if let Some(claims) = self.verified.get(token) {
            return if expired(claims.exp) {
                Err(TokenError::Expired)
            } else {
                Ok(claims)
            };
        }
        let claims = Arc::new(self.verify_in_full(token)?);
        self.verified.insert(token.into(), claims.clone());
        Ok(claims)
    }

    /// [`Keys::verify`] without the remembered tokens: decoding and the signature check, as on
    /// a token's first use.
    pub fn verify_in_full(&self, token: &str) -> Result<Claims, TokenError> {
        let header = decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::HS256 {
            return Err(TokenError::WrongAlgorithm);
        }
        let key = match header.kid.as_deref() {
            Some(kid) => self.verifying.get(kid).ok_or(TokenError::UnknownKey)?,
            None => return Err(TokenError::UnknownKey),
        };
        let claims = decode::<Claims>(token, key, &self.validation)
            .map(|d| d.claims)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                match e.kind() {
                    ErrorKind::ExpiredSignature => TokenError::Expired,
                    ErrorKind::InvalidSignature => TokenError::BadSignature,
                    ErrorKind::InvalidAlgorithm => TokenError::WrongAlgorithm,
                    _ => TokenError::Malformed,
                }
            })?;
        // The library lets a token through the whole of its `exp` second.
        if expired(claims.exp) {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

/// Whether the instant `exp` (seconds since the epoch) has come: the current second is `exp`
/// or later.
fn expired(exp: u64) -> bool {
    exp <= jsonwebtoken::get_current_timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "alice".into(),
            company: "acme".into(),
            roles: vec![Role::USER],
            ver: 1,
            iat: 0,
            exp,
        }
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    #[test]
    fn issued_tokens_verify_and_carry_claims() {
        let keys = Keys::new(&[7u8; 32], &[]);
        let c = claims(now() + 60);
        let token = keys.issue(&c);
        assert_eq!(*keys.verify(&token).unwrap(), c);
        // Again, now from the verified tokens.
        assert_eq!(*keys.verify(&token).unwrap(), c);
    }

    #[test]
    fn a_remembered_token_still_expires_to_the_second() {
        let keys = Keys::new(&[7u8; 32], &[]);
        let exp = now() + 2;
        let token = keys.issue(&claims(exp));
        assert!(keys.verify(&token).is_ok());
        // Valid before the instant exp, expired from it on.
        let expired_at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(exp);
        while std::time::SystemTime::now() < expired_at {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(keys.verify(&token), Err(TokenError::Expired));
    }

    #[test]
    fn a_tampered_copy_of_a_remembered_token_is_refused() {
        let keys = Keys::new(&[7u8; 32], &[]);
        let token = keys.issue(&claims(now() + 60));
        assert!(keys.verify(&token).is_ok());
        // Other claims under the remembered token's signature.
        let (head, rest) = token.split_once('.').unwrap();
        let signature = rest.split_once('.').unwrap().1;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut forged_claims = claims(now() + 60);
        forged_claims.roles = vec![Role::ADMIN];
        let forged = format!(
            "{head}.{}.{signature}",
            b64.encode(serde_json::to_vec(&forged_claims).unwrap())
        );
        assert_eq!(keys.verify(&forged), Err(TokenError::BadSignature));
        // And the signature alone changed.
        let mut resigned = token.clone();
        let last = resigned.pop().unwrap();
        resigned.push(if last == 'A' { 'B' } else { 'A' });
        assert!(keys.verify(&resigned).is_err());
        assert!(keys.verify(&token).is_ok());
    }

    #[test]
    fn expiry_is_exact() {
        let keys = Keys::new(&[7u8; 32], &[]);
        assert_eq!(
            keys.verify(&keys.issue(&claims(now() - 1))),
            Err(TokenError::Expired)
        );
        // Its exp second has begun: the instant has passed.
        assert_eq!(
            keys.verify(&keys.issue(&claims(now()))),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn another_key_or_algorithm_is_refused() {
        let keys = Keys::new(&[7u8; 32], &[]);
        let other = Keys::new(&[8u8; 32], &[]);
        assert_eq!(
            keys.verify(&other.issue(&claims(now() + 60))),
            Err(TokenError::UnknownKey)
        );
        // Same secret, same kid, but HS512.
        let mut header = Header::new(Algorithm::HS512);
        header.kid = Some(kid_of(&[7u8; 32]));
        let hs512 = encode(
            &header,
            &claims(now() + 60),
            &EncodingKey::from_secret(&[7u8; 32]),
        )
        .unwrap();
        assert_eq!(keys.verify(&hs512), Err(TokenError::WrongAlgorithm));
        // alg = none, no signature.
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let none = format!(
            "{}.{}.",
            b64.encode(format!(
                r#"{{"alg":"none","typ":"JWT","kid":"{}"}}"#,
                kid_of(&[7u8; 32])
            )),
            b64.encode(serde_json::to_vec(&claims(now() + 60)).unwrap())
        );
        assert!(keys.verify(&none).is_err());
        assert!(keys.verify("garbage").is_err());
    }

    #[test]
    fn rotated_keys_still_verify_old_tokens() {
        let old = Keys::new(&[1u8; 32], &[]);
        let token = old.issue(&claims(now() + 60));
        let rotated = Keys::new(&[2u8; 32], &[vec![1u8; 32]]);
        assert!(rotated.verify(&token).is_ok());
        assert!(rotated.verify(&rotated.issue(&claims(now() + 60))).is_ok());
    }
}
