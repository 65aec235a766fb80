use std::process::ExitCode;

/// mimalloc instead of the system allocator: under device traffic the operator allocates and
/// frees many short-lived JSON values, and glibc's malloc took a third of its CPU in profiles
/// (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use thing_operator::{
    api, build_info,
    config::{Cli, Command},
    runner,
};

fn print_or_fail(yaml: Result<String, serde_yaml::Error>) -> ExitCode {
    match yaml {
        Ok(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds { helm } => print_or_fail(if helm {
            api::helm_crds_yaml()
        } else {
            api::crds_yaml()
        }),
        Command::Version => {
            println!("{}", build_info::describe());
            ExitCode::SUCCESS
        }
        Command::Run(args) => match runner::run(*args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
