//! Password hashing: argon2id at (at least) the OWASP minimum, m=19 MiB, t=2, p=1. Hashing is
//! deliberately slow, so callers run it on blocking threads, never on the proxy's workers.

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::{Algorithm, Argon2, Params, Version};
use std::sync::OnceLock;

pub const MEMORY_KIB: u32 = 19 * 1024;
pub const ITERATIONS: u32 = 2;
pub const PARALLELISM: u32 = 1;

fn hasher() -> Argon2<'static> {
    let params = Params::new(MEMORY_KIB, ITERATIONS, PARALLELISM, None)
        .expect("OWASP argon2 parameters are valid");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// A PHC string (`$argon2id$v=19$m=19456,t=2,p=1$...`) for `password`.
pub fn hash(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    hasher()
        .hash_password(password.as_bytes(), &salt)
        .expect("hashing with valid parameters cannot fail")
        .to_string()
}

/// Whether `password` matches `phc`. A malformed stored hash never matches.
pub fn verify(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        // Verification uses the parameters recorded in the hash itself.
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// Burns the same work as a real verification, so an unknown account answers no faster.
pub fn verify_nothing(password: &str) {
    static DUMMY: OnceLock<String> = OnceLock::new();
    let dummy = DUMMY.get_or_init(|| hash("tollgate-timing-equaliser"));
    let _ = verify(password, dummy);
}

/// Whether a stored hash is argon2id with at least the minimum cost (config-given hashes are checked).
pub fn meets_minimum(phc: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(phc).map_err(|e| format!("not a PHC string: {e}"))?;
    if parsed.algorithm.as_str() != "argon2id" {
        return Err("must be argon2id".into());
    }
    let params = Params::try_from(&parsed).map_err(|e| format!("bad argon2 parameters: {e}"))?;
    if params.m_cost() < MEMORY_KIB || params.t_cost() < ITERATIONS || params.p_cost() < PARALLELISM
    {
        return Err(format!(
            "must use at least m={MEMORY_KIB}, t={ITERATIONS}, p={PARALLELISM}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_only_their_password_and_meet_the_minimum() {
        let h = hash("correct horse");
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify("correct horse", &h));
        assert!(!verify("correct horsE", &h));
        assert!(!verify("correct horse", "not a hash"));
        assert!(meets_minimum(&h).is_ok());
    }

    #[test]
    fn weak_hashes_are_refused() {
        let weak = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(1024, 1, 1, None).unwrap(),
        )
        .hash_password(b"x", &SaltString::generate(&mut OsRng))
        .unwrap()
        .to_string();
        assert!(meets_minimum(&weak).unwrap_err().contains("at least"));
    }
}
