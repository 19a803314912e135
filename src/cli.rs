//! The command line: `serve`, `check-config`, `demo-upstream`, and `user ...` to manage
//! accounts in the store. Each command prints what it did; errors say what to do.

use std::io::Read;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::config::{self, Config, LogFormat, QuotaValues};
use crate::model::{MethodGroup, Role, ServiceName};
use crate::store::{Store, UserQuota, UserRecord};

#[derive(Parser)]
#[command(name = "tollgate", version, about = "A metering, quota and audit proxy in front of computation services")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        #[arg(long, default_value = "config/default.toml")]
        config: PathBuf,
    },
    /// Check a config file and print every problem with its key path.
    CheckConfig { file: PathBuf },
    /// Run the demo upstream alone.
    DemoUpstream {
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: String,
        /// How long an asynchronous calculation takes.
        #[arg(long, default_value_t = 2000)]
        compute_time_ms: u64,
    },
    /// Manage users in the store (the server must be stopped: the store allows one process).
    User {
        #[arg(long, default_value = "config/default.toml")]
        config: PathBuf,
        #[command(subcommand)]
        action: UserAction,
    },
}

#[derive(Args)]
struct PasswordArg {
    /// The password; without it, the password is read from standard input.
    #[arg(long)]
    password: Option<String>,
}

#[derive(Subcommand)]
enum UserAction {
    /// Create a user.
    Add {
        username: String,
        #[arg(long)]
        company: String,
        /// One or two of ADMIN, PARTNER, USER, BOT.
        #[arg(long, value_delimiter = ',', default_value = "USER")]
        roles: Vec<String>,
        #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
        timezone: i32,
        #[command(flatten)]
        password: PasswordArg,
    },
    /// Set a new password (revokes the user's tokens).
    Passwd {
        username: String,
        #[command(flatten)]
        password: PasswordArg,
    },
    /// List users.
    List,
    /// Remove a user (their tokens stop working).
    Remove { username: String },
    /// Replace a user's roles.
    SetRoles {
        username: String,
        #[arg(value_delimiter = ',')]
        roles: Vec<String>,
    },
    /// Override one quota for a user; values not given are inherited.
    SetQuota {
        username: String,
        #[arg(long)]
        service: String,
        #[arg(long)]
        method_group: String,
        #[arg(long)]
        points_per_request: Option<u64>,
        #[arg(long)]
        points_per_day: Option<u64>,
        #[arg(long)]
        points_per_date_window: Option<u64>,
        #[arg(long)]
        date_window_days: Option<u32>,
        #[arg(long)]
        max_concurrent_execution: Option<u32>,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

fn load(path: &Path) -> Result<Config, String> {
    config::load(path).map_err(|problems| {
        let mut msg = format!("{}: {} problem(s):", path.display(), problems.len());
        for p in problems {
            msg.push_str(&format!("\n  {p}"));
        }
        msg
    })
}

/// Runs the command line; returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => load(&config).and_then(|c| {
            init_logging(c.server.log_format);
            crate::server::serve(c)
        }),
        Command::CheckConfig { file } => load(&file).map(|c| {
            println!("{}: ok ({} routes, {} upstreams, {} quotas, {} users)", file.display(), c.routes.len(), c.upstreams.len(), c.quotas.len(), c.users.len());
        }),
        Command::DemoUpstream { listen, compute_time_ms } => {
            init_logging(LogFormat::Text);
            crate::demo::run_standalone(&listen, crate::demo::DemoConfig { compute_time: std::time::Duration::from_millis(compute_time_ms) })
                .map_err(|e| e.to_string())
        }
        Command::User { config, action } => load(&config).and_then(|c| user(&c, action)),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("tollgate: {e}");
            1
        }
    }
}

fn read_password(arg: PasswordArg) -> Result<String, String> {
    let p = match arg.password {
        Some(p) => p,
        None => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map_err(|e| format!("reading the password from stdin: {e}"))?;
            s.trim_end_matches(['\n', '\r']).to_string()
        }
    };
    if !(1..=1000).contains(&p.chars().count()) {
        return Err("password: must be 1..1000 characters".into());
    }
    Ok(p)
}

fn roles(names: &[String]) -> Result<Vec<Role>, String> {
    let roles: Vec<Role> = names.iter().map(|r| r.parse::<Role>().map_err(|e| format!("role '{r}' {e}"))).collect::<Result<_, _>>()?;
    if roles.is_empty() || roles.len() > 2 {
        return Err("roles: give one or two roles".into());
    }
    Ok(roles)
}

fn user(config: &Config, action: UserAction) -> Result<(), String> {
    let store = Store::open(&config.store.path).map_err(|e| {
        format!("{}: {e} (is a Tollgate server running on this store? stop it first)", config.store.path.display())
    })?;
    let existing = |name: &str| -> Result<UserRecord, String> {
        store.user(name).map_err(|e| e.to_string())?.ok_or_else(|| format!("no user '{name}'"))
    };
    let save = |u: &UserRecord| store.put_user(u).map_err(|e| e.to_string());
    match action {
        UserAction::Add { username, company, roles: r, timezone, password } => {
            if !(2..=256).contains(&username.len()) || !crate::model::is_word(&username) {
                return Err("username: must be 2..256 word characters (\\w+)".into());
            }
            if !(3..=256).contains(&company.len()) || !crate::model::is_word(&company) {
                return Err("company: must be 3..256 word characters (\\w+)".into());
            }
            if !(-12..=12).contains(&timezone) {
                return Err("timezone: must be -12..12".into());
            }
            if store.user(&username).map_err(|e| e.to_string())?.is_some() {
                return Err(format!("user '{username}' exists already"));
            }
            let user = UserRecord {
                username: username.clone(),
                password_hash: crate::auth::password::hash(&read_password(password)?),
                company_key: company,
                roles: roles(&r)?,
                name: None,
                email: None,
                phone: None,
                timezone,
                token_version: 1,
                password_changed: true,
                quotas: Vec::new(),
            };
            save(&user)?;
            println!("added user {username} ({}, {:?})", user.company_key, user.roles);
        }
        UserAction::Passwd { username, password } => {
            let mut user = existing(&username)?;
            user.password_hash = crate::auth::password::hash(&read_password(password)?);
            user.token_version += 1;
            user.password_changed = true;
            save(&user)?;
            println!("changed the password of {username}; their earlier tokens are revoked");
        }
        UserAction::List => {
            for u in store.users().map_err(|e| e.to_string())? {
                let roles: Vec<&str> = u.roles.iter().map(|r| r.as_str()).collect();
                println!("{}\t{}\t{}\ttz={}", u.username, u.company_key, roles.join(","), u.timezone);
            }
        }
        UserAction::Remove { username } => {
            if !store.remove_user(&username).map_err(|e| e.to_string())? {
                return Err(format!("no user '{username}'"));
            }
            println!("removed user {username}");
        }
        UserAction::SetRoles { username, roles: r } => {
            let mut user = existing(&username)?;
            user.roles = roles(&r)?;
            user.token_version += 1;
            save(&user)?;
            println!("roles of {username} are now {:?}; their earlier tokens are revoked", user.roles);
        }
        UserAction::SetQuota { username, service, method_group, points_per_request, points_per_day, points_per_date_window, date_window_days, max_concurrent_execution } => {
            let mut user = existing(&username)?;
            let service: ServiceName = service.parse().map_err(|e| format!("service '{service}' {e}"))?;
            let method_group: MethodGroup = method_group.parse().map_err(|e| format!("method_group '{method_group}' {e}"))?;
            if date_window_days.is_some_and(|n| n < 2) {
                return Err("date_window_days: must be at least 2".into());
            }
            let values = QuotaValues { points_per_request, points_per_day, points_per_date_window, date_window_days, max_concurrent_execution };
            user.quotas.retain(|q| !(q.service == service && q.method_group == method_group));
            user.quotas.push(UserQuota { service, method_group, values });
            save(&user)?;
            println!("quota of {username} for {service}/{method_group} is now {values:?} (unset values are inherited)");
        }
    }
    Ok(())
}
