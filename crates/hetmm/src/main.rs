//! The `hetmm` command line: `demo` (the seed's mul_mat on the simulated device), `bench`
//! (measurements against the limits they are judged by), `info` (what this machine offers).
#![allow(clippy::print_stdout)]

mod cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// hetmm: one virtual address space for the CPU and accelerators.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs r = a x b on the device with the CPU's pointers and checks it on the CPU.
    Demo(cmd::demo::Args),
    /// Measures fault and migration paths against memcpy and raw userfaultfd in the same run.
    Bench(cmd::bench::Args),
    /// Prints what this machine offers (userfaultfd mode, devices).
    Info,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Demo(a) => cmd::demo::run(&a),
        Command::Bench(a) => cmd::bench::run(&a),
        Command::Info => cmd::info(),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hetmm: {e}");
            ExitCode::FAILURE
        }
    }
}
