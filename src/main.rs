use std::process::ExitCode;

use clap::Parser;
use thing_operator::{
    api,
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
        Command::Run(args) => match runner::run(*args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
