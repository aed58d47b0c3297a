//! The tidevm binary's command line: bad input gives one clear line and
//! exit code 2, never a panic.

use std::process::Command;

fn tidevm(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tidevm"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run tidevm");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_usage_error(args: &[&str], expected: &str) {
    let (code, _, stderr) = tidevm(args);
    assert_eq!(code, Some(2), "{args:?} -> {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line for {args:?}: {stderr}");
    assert!(stderr.starts_with("tidevm: "), "{stderr}");
    assert!(
        stderr.contains(expected),
        "{args:?}: '{stderr}' lacks '{expected}'"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_command_lines_exit_2_with_one_clear_line() {
    let exe = env!("CARGO_BIN_EXE_tidevm");
    assert_usage_error(&[], "--kernel is required");
    assert_usage_error(
        &["--kernel", "/no/such/vmlinux"],
        "--kernel: cannot open '/no/such/vmlinux'",
    );
    assert_usage_error(&["--kernel", "/"], "not a regular file");
    assert_usage_error(
        &["--kernel", exe, "--memory", "12Q"],
        "invalid value '12Q' for 'size'",
    );
    assert_usage_error(
        &["--kernel", exe, "--memory", "size=1G,flavour=mint"],
        "unknown option 'flavour'",
    );
    assert_usage_error(
        &["--kernel", exe, "--cpus", "boot=many"],
        "expected a non-negative integer",
    );
    assert_usage_error(
        &["--kernel", exe, "--disk", "path=/no/disk"],
        "--disk: cannot open '/no/disk'",
    );
    assert_usage_error(&["--kernel", exe, "--initrd"], "--initrd needs a value");
    assert_usage_error(
        &["--kernel", exe, "--bogus", "1"],
        "unknown argument '--bogus'",
    );
    assert_usage_error(
        &["--kernel", exe, "--serial", "file="],
        "expected file=PATH",
    );
}

#[test]
fn help_and_version_exit_0() {
    let (code, stdout, _) = tidevm(&["--help"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("--api-socket"));
    let (code, stdout, _) = tidevm(&["--version"]);
    assert_eq!(code, Some(0));
    assert!(stdout.starts_with("tidevm "));
}

#[test]
fn a_file_that_is_no_kernel_is_a_runtime_error_not_a_panic() {
    // This test binary is an ELF file but not a bootable kernel.
    let dir = std::env::temp_dir().join(format!("tidevm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk");
    std::fs::write(&junk, b"this is not a kernel").unwrap();
    let (code, _, stderr) = tidevm(&["--kernel", junk.to_str().unwrap(), "--serial", "off"]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("tidevm: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
