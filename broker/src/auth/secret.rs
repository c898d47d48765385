//! Secrets at rest and their checks: argon2id password hashes (PHC strings, as
//! `tidings-broker hash-password` makes them) and tokens, kept only as SHA-256
//! digests and compared in constant time, so neither content nor length leaks
//! through timing.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use subtle::ConstantTimeEq;

/// A SHA-256 digest of a secret: fixed length, so comparing two is constant time
/// whatever the secrets' lengths.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretDigest([u8; 32]);

impl std::fmt::Debug for SecretDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretDigest(<redacted>)")
    }
}

impl SecretDigest {
    /// The digest of `secret`.
    pub fn of(secret: &[u8]) -> SecretDigest {
        let digest = ring::digest::digest(&ring::digest::SHA256, secret);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        SecretDigest(out)
    }

    /// Compares in constant time.
    pub fn matches(&self, other: &SecretDigest) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

/// A stored argon2id password hash, parsed and checked at config load.
#[derive(Clone)]
pub struct PasswordHashString(String);

impl std::fmt::Debug for PasswordHashString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordHashString(<redacted>)")
    }
}

impl PasswordHashString {
    /// Parses a PHC string; it must be argon2id.
    pub fn parse(phc: &str) -> Result<PasswordHashString, String> {
        let parsed = PasswordHash::new(phc).map_err(|e| format!("not a PHC hash string: {e}"))?;
        if parsed.algorithm != Algorithm::Argon2id.ident() {
            return Err(format!(
                "algorithm `{}` is not argon2id; make one with `tidings-broker hash-password`",
                parsed.algorithm
            ));
        }
        if parsed.salt.is_none() || parsed.hash.is_none() {
            return Err("the hash string has no salt or no hash".into());
        }
        // The parameters must be ones argon2 accepts, or every login would fail.
        Params::try_from(&parsed).map_err(|e| format!("bad argon2 parameters: {e}"))?;
        Ok(PasswordHashString(phc.to_owned()))
    }

    /// Checks `password` against the hash. Costly by design (tens of
    /// milliseconds): call it off the async worker threads.
    pub fn verify(&self, password: &[u8]) -> bool {
        let Ok(parsed) = PasswordHash::new(&self.0) else {
            return false;
        };
        Argon2::default().verify_password(password, &parsed).is_ok()
    }

    /// The PHC string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Hashes `password` with argon2id and the default (OWASP-recommended)
/// parameters: 19 MiB of memory, 2 passes, 1 lane.
///
/// ```
/// let phc = tidings_broker::auth::hash_password("correct horse").unwrap();
/// assert!(phc.starts_with("$argon2id$"));
/// ```
pub fn hash_password(password: &str) -> Result<String, String> {
    hash_password_with(password, Params::default())
}

/// Hashes with explicit argon2id parameters (memory in KiB, passes, lanes); tests
/// use cheap ones.
pub fn hash_password_with(password: &str, params: Params) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Cheap argon2id parameters (8 KiB, 1 pass) for tests only: never for real
/// passwords.
pub fn test_params() -> Params {
    Params::new(8, 1, 1, None).expect("8 KiB, 1 pass, 1 lane are valid argon2 parameters")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify() {
        let phc = hash_password_with("pw", test_params()).unwrap();
        let hash = PasswordHashString::parse(&phc).unwrap();
        assert!(hash.verify(b"pw"));
        assert!(!hash.verify(b"pw2"));
        assert!(!hash.verify(b""));
    }

    #[test]
    fn default_params_hash_verifies() {
        let phc = hash_password("long enough").unwrap();
        assert!(
            PasswordHashString::parse(&phc)
                .unwrap()
                .verify(b"long enough")
        );
    }

    #[test]
    fn rejects_other_algorithms_and_garbage() {
        assert!(PasswordHashString::parse("plain").is_err());
        let argon2i = "$argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$0123456789abcdef0123456789abcdef";
        assert!(
            PasswordHashString::parse(argon2i)
                .unwrap_err()
                .contains("argon2id")
        );
    }

    #[test]
    fn digests_compare() {
        assert!(SecretDigest::of(b"abc").matches(&SecretDigest::of(b"abc")));
        assert!(!SecretDigest::of(b"abc").matches(&SecretDigest::of(b"abcd")));
        assert!(!SecretDigest::of(b"").matches(&SecretDigest::of(b"a")));
    }
}
