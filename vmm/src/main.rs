//! The `tidevm` binary: parse the command line, run the VM, map how it
//! ended to an exit code (0 guest power-off or reboot, 1 guest crash or VMM
//! error, 2 bad command line; 159 a system call the seccomp filters forbid).

use std::process::ExitCode;

use vmm::config::{parse_args, Command, USAGE};
use vmm::ExitReason;

fn main() -> ExitCode {
    vmm::logger::init();
    let (config, seccomp) = match parse_args(std::env::args().skip(1)) {
        Ok(Command::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("tidevm {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Ok(Command::Run { config, seccomp }) => (config, seccomp),
        Ok(Command::Serve { socket, seccomp }) => {
            return exit_code(vmm::run_api_only(&socket, seccomp))
        }
        Err(e) => {
            eprintln!("tidevm: {e}");
            return ExitCode::from(2);
        }
    };
    exit_code(vmm::run(*config, seccomp))
}

fn exit_code(result: Result<ExitReason, vmm::VmmError>) -> ExitCode {
    match result {
        Ok(ExitReason::PowerOff) | Ok(ExitReason::Reset) => ExitCode::SUCCESS,
        Ok(ExitReason::Crashed(why)) => {
            eprintln!("tidevm: guest crashed: {why}");
            ExitCode::FAILURE
        }
        Ok(ExitReason::Error(why)) => {
            eprintln!("tidevm: {why}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("tidevm: {e}");
            ExitCode::FAILURE
        }
    }
}
