//! `fient`: measure the clock against a cerv server; `--set` and `--slew`
//! correct it, `--watch` keeps at it.

use client::cli::{Args, Command, StatusArgs};
use client::{Exit, Failure};
use service::config::{FileInfo, LayerError};
use std::io::IsTerminal;
use std::process::ExitCode;

fn main() -> ExitCode {
    let (args, file) = match service::config::parse::<Args>(std::env::args_os().collect()) {
        Ok(layered) => (layered.args, layered.file.unwrap_or_default()),
        Err(LayerError::Clap(e)) => e.exit(),
        Err(LayerError::Config(e)) => {
            eprintln!("fient: {e}");
            return ExitCode::from(Exit::Usage as u8);
        }
    };
    init_logging();
    if let Some(Command::Status(status)) = &args.command {
        return ExitCode::from(ask_status(status) as u8);
    }
    let report = |failure: Failure| report(failure, &file);
    if args.check_config {
        return ExitCode::from(match args.plan() {
            Ok(_) => {
                match &args.config {
                    Some(path) => println!("fient: {}: the configuration is valid", path.display()),
                    None => println!("fient: the configuration is valid"),
                }
                Exit::Synced
            }
            Err(e) => report(Failure {
                exit: Exit::Usage,
                error: e.into(),
            }),
        } as u8);
    }
    let exit = match args.plan() {
        Err(e) => report(Failure {
            exit: Exit::Usage,
            error: e.into(),
        }),
        Ok(plan) => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Err(e) => report(Failure {
                exit: Exit::NoAnswer,
                error: anyhow::anyhow!("cannot start the async runtime: {e}"),
            }),
            Ok(runtime) => {
                let mut stdout = std::io::stdout();
                let outcome = runtime.block_on(async {
                    // Only a watch outlives a moment; a one-shot run keeps
                    // the default: Ctrl-C stops it at once.
                    let shutdown: std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> =
                        if plan.watch.is_some() {
                            Box::pin(async {
                                service::signals::on_signal().await;
                            })
                        } else {
                            Box::pin(std::future::pending())
                        };
                    client::run(&plan, client::system_clock(), &mut stdout, shutdown).await
                });
                match outcome {
                    Ok(()) => Exit::Synced,
                    Err(failure) => report(failure),
                }
            }
        },
    };
    ExitCode::from(exit as u8)
}

/// Prints the error once, as `fient: <cause chain>`, with where in the
/// config file the option it is about was set.
fn report(failure: Failure, file: &FileInfo) -> Exit {
    eprintln!("fient: {}", file.locate(&format!("{:#}", failure.error)));
    failure.exit
}

/// `fient status`: 0 when the daemon answered (and has synchronised), 1
/// when it has not synchronised yet or cannot be asked.
fn ask_status(args: &StatusArgs) -> Exit {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fient: cannot start the async runtime: {e}");
            return Exit::NoAnswer;
        }
    };
    if args.timeout <= service::Nanos::ZERO {
        eprintln!(
            "fient: invalid --timeout '{}': must be more than 0",
            args.timeout
        );
        return Exit::Usage;
    }
    let answer = runtime.block_on(service::control::query(
        &args.socket,
        "fient",
        args.timeout.unsigned_duration(),
    ));
    let status = match answer {
        Ok(service::control::DaemonStatus::Fient(s)) => s,
        Ok(service::control::DaemonStatus::Cerv(_)) => {
            eprintln!(
                "fient: '{}' is cerv's control socket; ask it with `cerv status`",
                args.socket.display()
            );
            return Exit::Usage;
        }
        Err(e) => {
            eprintln!("fient: {e}");
            return Exit::NoAnswer;
        }
    };
    let mut stdout = std::io::stdout();
    let written = if args.json {
        use std::io::Write;
        serde_json::to_writer_pretty(&mut stdout, &status)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(stdout))
    } else {
        client::status::write_human(&mut stdout, &status)
    };
    if let Err(e) = written
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("fient: cannot write the status: {e}");
        return Exit::NoAnswer;
    }
    if status.tracking.is_some() {
        Exit::Synced
    } else {
        Exit::NoAnswer
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    // rustls warns of every bad record on its own; fient says what failed
    // in one line (RUST_LOG=rustls=debug shows rustls's view).
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("warn,tarpc=error,rustls=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
