//! `fient`: measure the clock against a cerv server; `--set` and `--slew`
//! correct it, `--watch` keeps at it.

use clap::Parser;
use client::{Exit, Failure, cli::Args};
use std::io::IsTerminal;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging();
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

/// Prints the error once, as `fient: <cause chain>`.
fn report(failure: Failure) -> Exit {
    eprintln!("fient: {:#}", failure.error);
    failure.exit
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
