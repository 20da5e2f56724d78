//! `phm policy …`: check, explain and schema for IG policy files.

use clap::Subcommand;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// Validate policy files; exit 0 when all are valid, 1 with every error otherwise.
    Check {
        files: Vec<std::path::PathBuf>,
    },
}

pub fn run(cmd: PolicyCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCmd::Check { files } => {
            let mut ok = true;
            for f in files {
                let text = std::fs::read_to_string(&f)?;
                if let Err(e) = phm_policies::Policy::parse(&f.display().to_string(), &text) {
                    eprintln!("{e}");
                    ok = false;
                }
            }
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
    }
}
