//! Account administration shared by the CLI and a running server: one set of user commands,
//! applied to the store directly when no server holds it, or sent over the server's admin
//! socket (`<store>/admin.sock`, mode 0600, so only the store's owner can use it) when one does.
//! A running server applies a command and refreshes its user snapshot at once, so a password
//! change or removal revokes tokens immediately.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::QuotaValues;
use crate::model::{MethodGroup, Role, ServiceName};
use crate::store::{Store, UserQuota, UserRecord};

pub const SOCKET_NAME: &str = "admin.sock";

pub fn socket_path(store_path: &Path) -> PathBuf {
    store_path.join(SOCKET_NAME)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum UserCommand {
    Add {
        username: String,
        company: String,
        roles: Vec<String>,
        timezone: i32,
        password: String,
    },
    Passwd {
        username: String,
        password: String,
    },
    List,
    Remove {
        username: String,
    },
    SetRoles {
        username: String,
        roles: Vec<String>,
    },
    SetQuota {
        username: String,
        service: String,
        method_group: String,
        values: QuotaValues,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Reply {
    ok: bool,
    text: String,
}

fn roles(names: &[String]) -> Result<Vec<Role>, String> {
    let roles: Vec<Role> = names
        .iter()
        .map(|r| r.parse::<Role>().map_err(|e| format!("role '{r}' {e}")))
        .collect::<Result<_, _>>()?;
    if roles.is_empty() || roles.len() > 2 {
        return Err("roles: give one or two roles".into());
    }
    if roles.len() == 2 && roles[0] == roles[1] {
        return Err("roles: give one or two different roles".into());
    }
    Ok(roles)
}

/// Why a removed account's name is not given to a new account.
pub fn removed_name(username: &str) -> String {
    format!(
        "user '{username}' was removed, and its name is not given to a new account: the \
         removed account's audit, captures and statistics stay under it; choose another username"
    )
}

fn check_password(p: &str) -> Result<(), String> {
    if !(1..=1000).contains(&p.chars().count()) {
        return Err("password: must be 1..1000 characters".into());
    }
    Ok(())
}

/// Applies a command to the store; returns what to print.
pub fn apply(store: &Store, command: &UserCommand) -> Result<String, String> {
    let existing = |name: &str| -> Result<UserRecord, String> {
        store
            .user(name)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no user '{name}'"))
    };
    let save = |u: &UserRecord| store.put_user(u).map_err(|e| e.to_string());
    match command {
        UserCommand::Add {
            username,
            company,
            roles: r,
            timezone,
            password,
        } => {
            if !(2..=256).contains(&username.len()) || !crate::model::is_word(username) {
                return Err("username: must be 2..256 word characters (\\w+)".into());
            }
            if !(3..=256).contains(&company.len()) || !crate::model::is_word(company) {
                return Err("company: must be 3..256 word characters (\\w+)".into());
            }
            for (field, value) in [("username", username), ("company", company)] {
                if crate::model::is_reserved_name(value) {
                    return Err(format!("{field}: {}", crate::model::RESERVED_NAME_RULE));
                }
            }
            crate::trace::check_client_label(company, username)
                .map_err(|rule| format!("company: {rule}"))?;
            if !(-12..=12).contains(timezone) {
                return Err("timezone: must be -12..12".into());
            }
            check_password(password)?;
            let roles = roles(r)?;
            if store.user(username).map_err(|e| e.to_string())?.is_some() {
                return Err(format!("user '{username}' exists already"));
            }
            if store.was_removed(username).map_err(|e| e.to_string())? {
                return Err(removed_name(username));
            }
            let user = UserRecord {
                username: username.clone(),
                password_hash: crate::auth::password::hash(password),
                company_key: company.clone(),
                roles,
                name: None,
                email: None,
                phone: None,
                timezone: *timezone,
                token_version: crate::auth::first_token_version(),
                password_changed: true,
                quotas: Vec::new(),
                company_days_from: None,
            };
            save(&user)?;
            Ok(format!(
                "added user {username} ({}, {:?})",
                user.company_key, user.roles
            ))
        }
        UserCommand::Passwd { username, password } => {
            check_password(password)?;
            let mut user = existing(username)?;
            user.password_hash = crate::auth::password::hash(password);
            user.token_version += 1;
            user.password_changed = true;
            save(&user)?;
            Ok(format!(
                "changed the password of {username}; their earlier tokens are revoked"
            ))
        }
        UserCommand::List => {
            let mut out = String::new();
            for u in store.users().map_err(|e| e.to_string())? {
                let roles: Vec<&str> = u.roles.iter().map(|r| r.as_str()).collect();
                out.push_str(&format!(
                    "{}\t{}\t{}\ttz={}\n",
                    u.username,
                    u.company_key,
                    roles.join(","),
                    u.timezone
                ));
            }
            Ok(out.trim_end().to_string())
        }
        UserCommand::Remove { username } => {
            if !store.remove_user(username).map_err(|e| e.to_string())? {
                return Err(format!("no user '{username}'"));
            }
            Ok(format!(
                "removed user {username}; their tokens no longer work"
            ))
        }
        UserCommand::SetRoles { username, roles: r } => {
            let mut user = existing(username)?;
            let new_roles = roles(r)?;
            if crate::model::same_roles(&new_roles, &user.roles) {
                return Ok(format!(
                    "roles of {username} are already {:?}; nothing changed",
                    user.roles
                ));
            }
            user.roles = new_roles;
            user.token_version += 1;
            save(&user)?;
            Ok(format!(
                "roles of {username} are now {:?}; their earlier tokens are revoked",
                user.roles
            ))
        }
        UserCommand::SetQuota {
            username,
            service,
            method_group,
            values,
        } => {
            let mut user = existing(username)?;
            let service: ServiceName = service
                .parse()
                .map_err(|e| format!("service '{service}' {e}"))?;
            let method_group: MethodGroup = method_group
                .parse()
                .map_err(|e| format!("method_group '{method_group}' {e}"))?;
            let problems = values.out_of_bounds();
            if !problems.is_empty() {
                return Err(problems.join("; "));
            }
            user.quotas
                .retain(|q| !(q.service == service && q.method_group == method_group));
            user.quotas.push(UserQuota {
                service,
                method_group,
                values: *values,
            });
            save(&user)?;
            let set = values.describe();
            Ok(format!(
                "quota of {username} for {service}/{method_group} is now: {set}; values not given are inherited"
            ))
        }
    }
}

/// Sends a command to the server running on `store_path`.
///
/// # Errors
///
/// The outer error: no server could be asked (nothing listens, the exchange broke). The inner
/// result is the server's answer: what to print, or why it refused the command.
pub fn send(store_path: &Path, command: &UserCommand) -> Result<Result<String, String>, String> {
    let path = socket_path(store_path);
    let mut stream = std::os::unix::net::UnixStream::connect(&path)
        .map_err(|e| format!("{}: no running server answers ({e})", path.display()))?;
    let mut line = serde_json::to_vec(command).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stream.write_all(&line).map_err(|e| e.to_string())?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(|e| e.to_string())?;
    let reply: Reply = serde_json::from_str(&reply)
        .map_err(|e| format!("the server's reply is unreadable: {e}"))?;
    Ok(if reply.ok {
        Ok(reply.text)
    } else {
        Err(reply.text)
    })
}

/// A command runner: applies a command and returns what to print.
pub type Runner = Arc<dyn Fn(UserCommand) -> Result<String, String> + Send + Sync>;

/// Serves the admin socket until `shutdown` changes; `run` applies each command (the server
/// runs it under its user-write lock and refreshes its snapshot).
pub async fn serve_socket(
    run: Runner,
    store_path: PathBuf,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let path = socket_path(&store_path);
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "admin socket unavailable; user commands need a stopped server");
            return;
        }
    };
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let run = run.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
                    let (read, mut write) = stream.into_split();
                    let mut line = String::new();
                    let mut reader = tokio::io::BufReader::new(read);
                    if reader.read_line(&mut line).await.is_err() {
                        return;
                    }
                    let reply = match serde_json::from_str::<UserCommand>(&line) {
                        Ok(command) => {
                            match tokio::task::spawn_blocking(move || run(command)).await {
                                Ok(Ok(text)) => Reply { ok: true, text },
                                Ok(Err(text)) => Reply { ok: false, text },
                                Err(_) => Reply { ok: false, text: "the command failed".into() },
                            }
                        }
                        Err(e) => Reply { ok: false, text: format!("unreadable command: {e}") },
                    };
                    let mut out = serde_json::to_vec(&reply).unwrap_or_default();
                    out.push(b'\n');
                    let _ = write.write_all(&out).await;
                });
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}
