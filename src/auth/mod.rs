//! Who is calling: users and their passwords, the tokens Tollgate issues and checks, and login
//! throttling. Users live in the store; a copy-on-write snapshot of them serves the hot path,
//! so checking a token takes no lock. The HTTP side (parsing requests, shaping answers) is
//! `account`'s and `proxy`'s.

pub mod hashing;
pub mod jwt;
pub mod password;
pub mod throttle;

use foldhash::HashMap;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rand::RngCore;

use crate::config::{self, PasswordSeed, UserSeed};
use crate::error::ApiError;
use crate::model::Role;
use crate::store::{Store, UserRecord};

pub use jwt::{Claims, Keys, TokenError};

pub const DEFAULT_TTL_SECONDS: u64 = 86_400;
pub const MIN_TTL_SECONDS: u64 = 60;
pub const MAX_TTL_SECONDS: u64 = 31_556_926;

/// The environment variable that may carry the signing secret instead of the config.
pub const SECRET_ENV: &str = "TOLLGATE_JWT_SECRET";

/// The token version of a new account: random, so that the tokens of an account removed
/// earlier under the same username (their versions counted up from that account's own start)
/// do not come back to life with the new account's roles.
pub fn first_token_version() -> u32 {
    // Below 2^31, so version bumps never wrap; never 0.
    (rand::thread_rng().next_u32() >> 1).max(1)
}

pub struct Authority {
    keys: Keys,
    store: Arc<Store>,
    directory: ArcSwap<HashMap<String, Arc<UserRecord>>>,
    throttle: throttle::LoginThrottle,
    /// Argon2 work (19 MiB each), on as many low-priority threads as there are cores.
    hashing: hashing::HashingPool,
    /// Serialises writes of users, so that no write starts from a record another one has
    /// outdated and the snapshot never loses a concurrent change (a password change's version
    /// bump above all).
    writes: parking_lot::Mutex<()>,
}

/// Reads the signing secret: config, then the environment, then the secret file, generating
/// 256 random bits into it (mode 0600) on first start.
pub fn load_secret(auth: &config::Auth) -> Result<Vec<u8>, String> {
    if let Some(s) = &auth.secret {
        return Ok(s.as_bytes().to_vec());
    }
    if let Ok(s) = std::env::var(SECRET_ENV) {
        if s.len() < 32 {
            return Err(format!("{SECRET_ENV} must be at least 32 characters"));
        }
        return Ok(s.into_bytes());
    }
    read_or_create_secret(&auth.secret_file)
}

fn read_or_create_secret(path: &Path) -> Result<Vec<u8>, String> {
    match std::fs::read_to_string(path) {
        Ok(s) if s.trim().len() >= 32 => {
            let mode = std::fs::metadata(path)
                .map(|m| m.permissions().mode() & 0o777)
                .unwrap_or(0);
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "secret file is readable by others; tightening to 0600");
                let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
            }
            Ok(s.trim().as_bytes().to_vec())
        }
        Ok(_) => Err(format!(
            "{}: secret is shorter than 32 characters",
            path.display()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bits = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut bits);
            let hex: String = bits.iter().map(|b| format!("{b:02x}")).collect();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            }
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| format!("{}: cannot create: {e}", path.display()))?;
            f.write_all(hex.as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(|e| format!("{}: {e}", path.display()))?;
            tracing::info!(path = %path.display(), "generated a new token signing secret");
            Ok(hex.into_bytes())
        }
        Err(e) => Err(format!("{}: cannot read: {e}", path.display())),
    }
}

fn now_seconds() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// Creates the users the config lists that the store lacks; re-applies a config password only
/// while the user has not changed it; roles and company follow the config.
pub fn seed_users(store: &Store, seeds: &[UserSeed]) -> Result<(), String> {
    for seed in seeds {
        let existing = store.user(&seed.username).map_err(|e| e.to_string())?;
        let password_hash = |current: Option<&str>| -> Result<String, String> {
            match &seed.password {
                PasswordSeed::Plain(p) => Ok(match current {
                    Some(h) if password::verify(p, h) => h.to_string(),
                    _ => password::hash(p),
                }),
                PasswordSeed::Hash(h) => {
                    password::meets_minimum(h)
                        .map_err(|e| format!("users.{}.password_hash: {e}", seed.username))?;
                    Ok(h.clone())
                }
            }
        };
        if existing.is_none()
            && store
                .was_removed(&seed.username)
                .map_err(|e| e.to_string())?
        {
            return Err(format!(
                "users.{}: {}; take it out of the config",
                seed.username,
                crate::admin::removed_name(&seed.username)
            ));
        }
        let record = match existing {
            None => UserRecord {
                username: seed.username.clone(),
                password_hash: password_hash(None)?,
                company_key: seed.company_key.clone(),
                roles: seed.roles.clone(),
                name: seed.name.clone(),
                email: seed.email.clone(),
                phone: seed.phone.clone(),
                timezone: seed.timezone,
                token_version: first_token_version(),
                password_changed: false,
                quotas: Vec::new(),
                company_days_from: None,
            },
            Some(mut user) => {
                if !user.password_changed {
                    let hash = password_hash(Some(&user.password_hash))?;
                    if hash != user.password_hash {
                        user.password_hash = hash;
                        user.token_version += 1;
                    }
                }
                if !crate::model::same_roles(&user.roles, &seed.roles) {
                    // A role change revokes the tokens issued before, which carry the old roles.
                    user.roles = seed.roles.clone();
                    user.token_version += 1;
                }
                user.move_to_company(seed.company_key.clone());
                user
            }
        };
        store.put_user(&record).map_err(|e| e.to_string())?;
    }
    Ok(())
}

impl Authority {
    pub fn new(
        keys: Keys,
        store: Arc<Store>,
        auth: &config::Auth,
    ) -> Result<Arc<Authority>, String> {
        let authority = Authority {
            keys,
            store,
            directory: ArcSwap::from_pointee(HashMap::default()),
            throttle: throttle::LoginThrottle::new(
                auth.login_failures_per_account_per_minute,
                auth.login_failures_per_address_per_minute,
            ),
            hashing: hashing::HashingPool::start(
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2),
                hashing::NICE,
            ),
            writes: parking_lot::Mutex::new(()),
        };
        authority.reload()?;
        Ok(Arc::new(authority))
    }

    /// Re-reads the users from the store into the hot-path snapshot.
    pub fn reload(&self) -> Result<(), String> {
        // Under the write lock: a write published between reading and swapping would be lost.
        let _writing = self.writes.lock();
        self.reload_locked()
    }

    /// Runs a write that goes to the store directly (an admin command) under the same write
    /// lock as the API's own writes, so neither undoes the other, then refreshes the snapshot.
    pub fn write_directly<T>(&self, write: impl FnOnce(&Store) -> T) -> Result<T, String> {
        let _writing = self.writes.lock();
        let result = write(&self.store);
        self.reload_locked()?;
        Ok(result)
    }

    fn reload_locked(&self) -> Result<(), String> {
        let users = self.store.users().map_err(|e| e.to_string())?;
        let map = users
            .into_iter()
            .map(|u| (u.username.clone(), Arc::new(u)))
            .collect();
        self.directory.store(Arc::new(map));
        Ok(())
    }

    /// Every account, as of the last reload.
    pub fn users(&self) -> Vec<Arc<UserRecord>> {
        self.directory.load().values().cloned().collect()
    }

    pub fn user(&self, username: &str) -> Option<Arc<UserRecord>> {
        self.directory.load().get(username).cloned()
    }

    /// The token's user, if the token is valid now: signature, algorithm, expiry, the user still
    /// exists, and no password change since it was issued.
    pub fn verify_token(&self, token: &str) -> Result<Arc<UserRecord>, TokenError> {
        let claims = self.keys.verify(token)?;
        match self.directory.load().get(&claims.sub) {
            Some(user) if user.token_version == claims.ver => Ok(user.clone()),
            _ => Err(TokenError::BadSignature),
        }
    }

    /// The caller of a request from its `Authorization` header value.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Arc<UserRecord>, ApiError> {
        let header = authorization
            .ok_or_else(|| ApiError::unauthorized("Authorization: a Bearer token is required"))?;
        let token = std::str::from_utf8(header)
            .ok()
            // The scheme name is case-insensitive (RFC 9110 11.1).
            .and_then(|h| {
                h.get(..7)
                    .filter(|scheme| scheme.eq_ignore_ascii_case("bearer "))
                    .map(|_| &h[7..])
            })
            .map(str::trim)
            .ok_or_else(|| ApiError::unauthorized("Authorization: must be 'Bearer <token>'"))?;
        self.verify_token(token).map_err(|e| match e {
            TokenError::Expired => ApiError::unauthorized("token has expired"),
            _ => ApiError::unauthorized("token is not valid"),
        })
    }

    fn issue(&self, user: &UserRecord, ttl_seconds: u64) -> String {
        let iat = now_seconds();
        self.keys.issue(&Claims {
            sub: user.username.clone(),
            company: user.company_key.clone(),
            roles: user.roles.clone(),
            ver: user.token_version,
            iat,
            exp: iat + ttl_seconds,
        })
    }

    async fn hash_work<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        self.hashing.run(work).await.map_err(|e| match e {
            hashing::HashingError::Busy => too_many_at_once(),
            hashing::HashingError::Gone => ApiError::internal("shutting down"),
        })
    }

    /// Waits for the turn of a password check on `username` from `address` (see
    /// [`throttle::LoginThrottle::turn`]). A locked account or address is refused with
    /// `locked` and Retry-After, at once rather than after the attempts queued on it, and
    /// again when the attempts before this one locked it meanwhile.
    async fn take_turn(
        &self,
        username: &str,
        address: Option<IpAddr>,
        locked: &str,
    ) -> Result<throttle::Turn<'_>, ApiError> {
        let refused = || {
            self.throttle
                .refused(username, address)
                .map(|wait| ApiError::too_many(locked, wait))
        };
        if let Some(refusal) = refused() {
            return Err(refusal);
        }
        let turn = self
            .throttle
            .turn(username, address)
            .await
            .map_err(|throttle::Crowded| too_many_at_once())?;
        match refused() {
            Some(refusal) => Err(refusal),
            None => Ok(turn),
        }
    }

    /// Checks a password and issues a token. Unknown users take the same time and get the same
    /// answer as a wrong password.
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        ttl_seconds: u64,
        address: Option<IpAddr>,
    ) -> Result<String, ApiError> {
        let _turn = self
            .take_turn(username, address, "too many failed logins; try again later")
            .await?;
        let user = self.user(username);
        let stored = user.as_ref().map(|u| u.password_hash.clone());
        let attempt = password.to_string();
        let ok = self
            .hash_work(move || match stored {
                Some(h) => password::verify(&attempt, &h),
                None => {
                    password::verify_nothing(&attempt);
                    false
                }
            })
            .await?;
        match user {
            Some(user) if ok => Ok(self.issue(&user, ttl_seconds)),
            _ => {
                self.throttle.failed(username, address);
                Err(ApiError::unauthorized("username or password is wrong"))
            }
        }
    }

    /// Changes the caller's password, revoking every token issued before, and returns a new one.
    /// A wrong current password counts as a failed login: a stolen token must not become a way
    /// to guess the password without limit.
    pub async fn change_password(
        &self,
        user: &UserRecord,
        current: &str,
        new: &str,
        address: Option<IpAddr>,
    ) -> Result<String, ApiError> {
        let _turn = self
            .take_turn(
                &user.username,
                address,
                "current_password: too many failed attempts; try again later",
            )
            .await?;
        let verified = user.password_hash.clone();
        let stored = verified.clone();
        let (current, new) = (current.to_string(), new.to_string());
        let new_hash = self
            .hash_work(move || password::verify(&current, &stored).then(|| password::hash(&new)))
            .await?
            .ok_or_else(|| {
                self.throttle.failed(&user.username, address);
                ApiError::unauthorized("current_password: does not match")
            })?;
        let updated = self
            .update(&user.username, |u| {
                // Changed meanwhile: the current password checked above is no longer current.
                if u.password_hash != verified {
                    return Err(ApiError::unauthorized("current_password: does not match"));
                }
                u.password_hash = new_hash;
                u.token_version += 1;
                u.password_changed = true;
                Ok(())
            })?
            .ok_or_else(|| ApiError::unauthorized("user no longer exists"))?;
        Ok(self.issue(&updated, DEFAULT_TTL_SECONDS))
    }

    /// Changes one user, starting from the stored record (not from a snapshot a concurrent write
    /// may have outdated), stores it and refreshes the snapshot, all under the write lock.
    /// `None` when there is no such user.
    pub fn update(
        &self,
        username: &str,
        change: impl FnOnce(&mut UserRecord) -> Result<(), ApiError>,
    ) -> Result<Option<UserRecord>, ApiError> {
        let _writing = self.writes.lock();
        let Some(mut user) = self
            .store
            .user(username)
            .map_err(|e| ApiError::internal(e.to_string()))?
        else {
            return Ok(None);
        };
        change(&mut user)?;
        self.publish(&user)?;
        Ok(Some(user))
    }

    /// Stores a user (whole) and refreshes the snapshot.
    pub fn save(&self, user: &UserRecord) -> Result<(), ApiError> {
        let _writing = self.writes.lock();
        self.publish(user)
    }

    fn publish(&self, user: &UserRecord) -> Result<(), ApiError> {
        self.store
            .put_user(user)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let mut map = HashMap::clone(&self.directory.load());
        map.insert(user.username.clone(), Arc::new(user.clone()));
        self.directory.store(Arc::new(map));
        Ok(())
    }

    /// Roles of a valid token, for /account/token/validation.
    pub fn validate(&self, token: &str) -> Option<Vec<Role>> {
        self.verify_token(token).ok().map(|u| u.roles.clone())
    }
}

/// Too many password checks wait: for the hashing threads, or for their turn.
fn too_many_at_once() -> ApiError {
    ApiError::unavailable("too many logins at once; try again shortly", 1)
}
