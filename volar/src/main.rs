//! volar: the Volant CLI. It speaks only the gateway's REST API.

mod cli;
mod client;
mod commands;
mod output;
mod systemd;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use cli::{Cli, Command};

/// Writes the man pages: volar.1, and volar-<command>.1 for each command.
fn man(dir: Option<std::path::PathBuf>) -> std::io::Result<()> {
    let cmd = Cli::command();
    let Some(dir) = dir else {
        return clap_mangen::Man::new(cmd).render(&mut std::io::stdout());
    };
    std::fs::create_dir_all(&dir)?;
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    std::fs::write(dir.join("volar.1"), page)?;
    for sub in cmd.get_subcommands() {
        let name = format!("volar-{}", sub.get_name());
        let mut page = Vec::new();
        clap_mangen::Man::new(sub.clone().name(name.clone())).render(&mut page)?;
        std::fs::write(dir.join(format!("{name}.1")), page)?;
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "volar", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Man { dir } => {
            return match man(dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("volar: error: writing the man pages: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    match commands::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("volar: error: {e}");
            ExitCode::FAILURE
        }
    }
}
