//! The command line: `serve`, `check-config`, `demo-upstream`, and `user ...` to manage
//! accounts in the store. Each command prints what it did; errors say what to do.

use std::io::Read;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::admin::{self, UserCommand};
use crate::config::{self, Config, LogFormat, QuotaValues};
use crate::store::Store;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "A metering, quota and audit proxy in front of computation services"
)]
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
    /// Manage users: directly in the store, or through the running server that holds it.
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
    /// Remove a user (their tokens stop working; the name stays taken, with its records).
    Remove { username: String },
    /// Replace a user's roles.
    SetRoles {
        username: String,
        #[arg(value_delimiter = ',')]
        roles: Vec<String>,
    },
    /// Set a user's override of one quota: it replaces any earlier override of that service
    /// and method group; values not given are inherited from the company and the defaults.
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

/// Set once the log is JSON: a fatal error then goes to it as one more JSON line, not as text
/// a log shipper could not read.
static JSON_LOG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: a log file or journald gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Json => builder.json().try_init().inspect(|_| {
            JSON_LOG.store(true, std::sync::atomic::Ordering::Relaxed);
        }),
        LogFormat::Text => builder.try_init(),
    };
}

fn load(path: &Path) -> Result<Config, String> {
    config::load(path).map_err(|problems| problem_list(path, problems))
}

/// Loads the config and resolves its upstreams' host names: for what serves, or checks what
/// would.
fn load_resolved(path: &Path) -> Result<Config, String> {
    let mut c = load(path)?;
    config::resolve_upstreams(&mut c).map_err(|problems| problem_list(path, problems))?;
    Ok(c)
}

fn problem_list(path: &Path, problems: Vec<config::Problem>) -> String {
    let mut msg = format!("{}: {} problem(s):", path.display(), problems.len());
    for p in problems {
        msg.push_str(&format!("\n  {p}"));
    }
    msg
}

/// Runs the command line; returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => load_resolved(&config).and_then(|c| {
            init_logging(c.server.log_format);
            crate::server::serve(c)
        }),
        Command::CheckConfig { file } => load_resolved(&file).map(|c| {
            println!(
                "{}: ok ({} routes, {} upstreams, {} quotas, {} users)",
                file.display(),
                c.routes.len(),
                c.upstreams.len(),
                c.quotas.len(),
                c.users.len()
            );
        }),
        Command::DemoUpstream {
            listen,
            compute_time_ms,
        } => {
            init_logging(LogFormat::Text);
            crate::demo::run_standalone(
                &listen,
                crate::demo::DemoConfig {
                    compute_time: std::time::Duration::from_millis(compute_time_ms),
                },
            )
            .map_err(|e| e.to_string())
        }
        Command::User { config, action } => {
            // Output piped into `head` and cut short ends the command quietly, as for any
            // Unix tool, not with a panic over the broken pipe.
            // SAFETY: setting a signal's disposition before any thread is started.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            }
            load(&config).and_then(|c| user(&c, action))
        }
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            if JSON_LOG.load(std::sync::atomic::Ordering::Relaxed) {
                // Written directly, in the log's shape: no log filter may hide why it stopped.
                let line = serde_json::json!({
                    "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                    "level": "ERROR",
                    "fields": {"message": "tollgate stopped on an error", "error": e},
                    "target": "tollgate::cli",
                });
                eprintln!("{line}");
            } else {
                eprintln!("tollgate: {e}");
            }
            1
        }
    }
}

fn read_password(arg: PasswordArg) -> Result<String, String> {
    // Length rules are checked where the command is applied.
    let p = match arg.password {
        Some(p) => p,
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| format!("reading the password from stdin: {e}"))?;
            s.trim_end_matches(['\n', '\r']).to_string()
        }
    };
    Ok(p)
}

fn user(config: &Config, action: UserAction) -> Result<(), String> {
    let command = match action {
        UserAction::Add {
            username,
            company,
            roles,
            timezone,
            password,
        } => UserCommand::Add {
            username,
            company,
            roles,
            timezone,
            password: read_password(password)?,
        },
        UserAction::Passwd { username, password } => UserCommand::Passwd {
            username,
            password: read_password(password)?,
        },
        UserAction::List => UserCommand::List,
        UserAction::Remove { username } => UserCommand::Remove { username },
        UserAction::SetRoles { username, roles } => UserCommand::SetRoles { username, roles },
        UserAction::SetQuota {
            username,
            service,
            method_group,
            points_per_request,
            points_per_day,
            points_per_date_window,
            date_window_days,
            max_concurrent_execution,
        } => UserCommand::SetQuota {
            username,
            service,
            method_group,
            values: QuotaValues {
                points_per_request,
                points_per_day,
                points_per_date_window,
                date_window_days,
                max_concurrent_execution,
            },
        },
    };
    let path = &config.store.path;
    if matches!(command, UserCommand::List) && !path.exists() {
        // Opening would create an empty store, and a mistyped path would read as "no users".
        return Err(format!(
            "store.path: {} does not exist: no store to list the users of",
            path.display()
        ));
    }
    // A running server holds the store: hand the command to it instead.
    let text = match Store::open(path) {
        Ok(store) => admin::apply(&store, &command)?,
        Err(open_error) if admin::socket_path(path).exists() => admin::send(path, &command)
            .map_err(|e| format!("{e} (and the store could not be opened: {open_error})"))??,
        Err(e) => return Err(format!("{e} (store.path: {})", path.display())),
    };
    if !text.is_empty() {
        println!("{text}");
    }
    Ok(())
}
