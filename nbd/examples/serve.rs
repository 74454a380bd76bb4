//! Serves a raw image file or block device over NBD until SIGINT/SIGTERM.
//!
//! ```text
//! cargo run --release --example serve -- [--bind ADDR] [--port N] [--name NAME] [--read-only] [-v] FILE
//! ```
//!
//! Defaults: 127.0.0.1, port 10809 (0 picks a free one), export name `disk0`. Prints
//! `listening on ADDR` once ready, and the export's counters on exit. Used by
//! `bench/nbd.sh`.

use std::process::ExitCode;

use nbd::{CancellationToken, Export, FileBackend, Server, ServerConfig};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

struct Args {
    bind: String,
    port: u16,
    name: String,
    read_only: bool,
    verbose: bool,
    file: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        bind: "127.0.0.1".into(),
        port: 10809,
        name: "disk0".into(),
        read_only: false,
        verbose: false,
        file: String::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |flag: &str| it.next().ok_or(format!("{flag} needs a value"));
        match a.as_str() {
            "--bind" => args.bind = value("--bind")?,
            "--port" => {
                args.port = value("--port")?
                    .parse()
                    .map_err(|e| format!("--port: {e}"))?
            }
            "--name" => args.name = value("--name")?,
            "--read-only" => args.read_only = true,
            "-v" | "--verbose" => args.verbose = true,
            _ if a.starts_with('-') => return Err(format!("unknown option {a}")),
            _ if args.file.is_empty() => args.file = a,
            _ => return Err("only one FILE".into()),
        }
    }
    if args.file.is_empty() {
        return Err(
            "usage: serve [--bind ADDR] [--port N] [--name NAME] [--read-only] [-v] FILE".into(),
        );
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let level = if args.verbose {
        tracing::Level::DEBUG
    } else {
        tracing::Level::WARN
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .init();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("serve: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let backend = if args.read_only {
        FileBackend::open_read_only(&args.file)?
    } else {
        FileBackend::open(&args.file)?
    };
    let server = Server::new(ServerConfig::default());
    let export = Export::new(args.name.clone(), backend).with_description(args.file.clone());
    server.add_export(export.clone())?;
    let listener = TcpListener::bind((args.bind.as_str(), args.port)).await?;
    println!("listening on {}", listener.local_addr()?);

    let stop = CancellationToken::new();
    let (mut term, mut int) = (
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
    );
    tokio::spawn({
        let stop = stop.clone();
        async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            stop.cancel();
        }
    });
    server.serve(listener, stop).await;
    eprintln!("{:?}\n{:?}", server.stats(), export.stats());
    Ok(())
}
