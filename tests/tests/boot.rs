//! Booting real Linux guests: ELF and bzImage kernels, SMP, memory size,
//! ACPI, the serial console, virtio-blk, and a clean exit on reboot.

use std::time::Duration;

use e2e::*;

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// Prints what the guest sees of its hardware, then reboots.
const REPORT: &str = r#"
results_begin
kv CPUS "$(nproc)"
kv MEMTOTAL_KB "$(awk '/^MemTotal/ {print $2}' /proc/meminfo)"
kv ACPI_DSDT "$(test -e /sys/firmware/acpi/tables/DSDT && echo yes || echo no)"
kv RSDP_MISSING "$(dmesg | grep -c 'A valid RSDP was not found')"
kv CONSOLE "$(cat /proc/consoles | awk '{print $1}' | head -1)"
kv HYPERVISOR "$(dmesg | grep -o 'Hypervisor detected: .*' | head -1)"
kv KVMCLOCK "$(dmesg | grep -c 'kvm-clock: Using msrs')"
results_end
"#;

/// Boots `kernel` with the REPORT scenario, then `ending` (the scenario's
/// last command), checks what the guest saw, and that tidevm exits 0 for
/// the reason `stop` (as logged).
fn boot_and_report(kernel: &str, cpus: u32, mem_mib: u64, ending: &str, stop: &str) {
    require_e2e();
    let work = work_dir(&format!("boot-{kernel}-{cpus}"));
    let initrd = initramfs(&work, &format!("{REPORT}\n{ending}\n"));
    let cpus_arg = cpus.to_string();
    let mem_arg = format!("{mem_mib}M");
    let extra = ["--cpus", cpus_arg.as_str(), "--memory", mem_arg.as_str()];
    let mut vm = Vm::start(&guest_args(kernel, &initrd, &extra), None);
    vm.wait_for("TIDEVM-RESULTS-BEGIN", BOOT_TIMEOUT);
    let t = Duration::from_secs(30);
    assert_eq!(
        vm.value_from(0, "CPUS", t).1,
        cpus.to_string(),
        "guest CPUs online"
    );
    let mem_kib: u64 = vm.value_from(0, "MEMTOTAL_KB", t).1.parse().unwrap();
    let configured_kib = mem_mib * 1024;
    assert!(
        mem_kib <= configured_kib && mem_kib >= configured_kib * 85 / 100,
        "MemTotal {mem_kib} KiB is not consistent with --memory {mem_mib}M"
    );
    assert_eq!(
        vm.value_from(0, "ACPI_DSDT", t).1,
        "yes",
        "guest found the ACPI tables"
    );
    assert_eq!(vm.value_from(0, "RSDP_MISSING", t).1, "0");
    assert_eq!(
        vm.value_from(0, "CONSOLE", t).1,
        "ttyS0",
        "userspace prints through the UART"
    );
    // Without hotplug_method=hv-balloon the guest sees KVM and its clock.
    assert_eq!(
        vm.value_from(0, "HYPERVISOR", t).1,
        "Hypervisor detected: KVM"
    );
    assert_eq!(vm.value_from(0, "KVMCLOCK", t).1, "1", "kvm-clock in use");
    let status = vm.wait_exit(Duration::from_secs(60));
    assert_eq!(
        status.code(),
        Some(0),
        "'{ending}' ends tidevm with 0; stderr:\n{}",
        vm.stderr()
    );
    let logged = format!("VM stopping: {stop}");
    assert!(
        vm.stderr().contains(&logged),
        "no '{logged}' in stderr: {}",
        vm.stderr()
    );
}

#[test]
fn elf_vmlinux_boots_with_two_cpus() {
    boot_and_report("vmlinux", 2, 512, "reboot -f", "Reset");
}

#[test]
fn bzimage_boots_with_one_cpu_and_powers_off() {
    boot_and_report("bzImage", 1, 768, "poweroff -f", "PowerOff");
}

#[test]
fn virtio_blk_reads_and_writes_reach_the_image() {
    require_e2e();
    let work = work_dir("virtio-blk");
    let disk = work.join("disk.ext4");
    std::fs::copy(asset("disk.ext4"), &disk).unwrap();
    let ro_disk = work.join("ro.ext4");
    std::fs::copy(asset("disk.ext4"), &ro_disk).unwrap();
    let scenario = r#"
mkdir -p /mnt/rw /mnt/ro
mount -t ext4 /dev/vda /mnt/rw
mount -t ext4 -o ro /dev/vdb /mnt/ro
results_begin
kv HELLO "$(cat /mnt/rw/hello.txt)"
echo "written by the guest" > /mnt/rw/guest.txt
sync
kv VDB_RO "$(cat /sys/block/vdb/ro)"
if dd if=/dev/zero of=/dev/vdb bs=512 count=1 oflag=direct 2>/dev/null; then kv RO_WRITE ok; else kv RO_WRITE refused; fi
umount /mnt/rw
umount /mnt/ro
results_end
"#;
    let initrd = initramfs(&work, scenario);
    let rw_arg = format!("path={}", disk.display());
    let ro_arg = format!("path={},readonly=on", ro_disk.display());
    let extra = ["--disk", rw_arg.as_str(), "--disk", ro_arg.as_str()];
    let mut vm = Vm::start(&guest_args("vmlinux", &initrd, &extra), None);
    vm.wait_for("TIDEVM-RESULTS-BEGIN", BOOT_TIMEOUT);
    let t = Duration::from_secs(60);
    assert_eq!(vm.value_from(0, "HELLO", t).1, "hello from the host");
    assert_eq!(vm.value_from(0, "VDB_RO", t).1, "1");
    assert_eq!(vm.value_from(0, "RO_WRITE", t).1, "refused");
    vm.wait_for("TIDEVM-RESULTS-END", t);
    assert_eq!(vm.wait_exit(Duration::from_secs(60)).code(), Some(0));
    // The host reads the guest's file out of the image.
    let out = std::process::Command::new("debugfs")
        .args(["-R", "cat /guest.txt"])
        .arg(&disk)
        .output()
        .expect("run debugfs");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "written by the guest"
    );
    let ro_unchanged =
        std::fs::read(&ro_disk).unwrap() == std::fs::read(asset("disk.ext4")).unwrap();
    assert!(ro_unchanged, "the read-only image must not change");
}

#[test]
fn flushed_disk_writes_survive_sigkill() {
    require_e2e();
    const MIB_WRITTEN: u64 = 256;
    let work = work_dir("virtio-blk-sigkill");
    let disk = work.join("raw.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len((MIB_WRITTEN + 16) * MIB))
        .unwrap();
    // Random data, written raw with an fsync at the end (a FLUSH request),
    // and its checksum; then the guest idles and is never shut down.
    let scenario = format!(
        r#"
mkdir -p /dev/shm && mount -t tmpfs -o size=512M tmpfs /dev/shm
dd if=/dev/urandom of=/dev/shm/data bs=1M count={MIB_WRITTEN} 2>/dev/null
dd if=/dev/shm/data of=/dev/vda bs=1M conv=fsync 2>/dev/null
kv WRITTEN "$(md5sum < /dev/shm/data | cut -d' ' -f1)"
sleep 3600
"#
    );
    let initrd = initramfs(&work, &scenario);
    let disk_arg = format!("path={}", disk.display());
    let extra = ["--memory", "1G", "--disk", disk_arg.as_str()];
    let mut vm = Vm::start(&guest_args("vmlinux", &initrd, &extra), None);
    // Boot, then first touches of the tmpfs file and of the page cache
    // behind the disk writes: a hang guard that grows with the size, like
    // `fill`'s.
    let guard = BOOT_TIMEOUT + Duration::from_secs(2 * MIB_WRITTEN);
    let sum = vm.value_from(0, "WRITTEN", guard).1;
    let status = vm.kill();
    assert_eq!(status.code(), None, "tidevm died of the signal");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {} {} | md5sum | cut -d' ' -f1",
            MIB_WRITTEN * MIB,
            disk.display()
        ))
        .output()
        .expect("checksum the image");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        sum,
        "what the guest wrote and flushed is in the image"
    );
}

#[test]
fn a_guest_kernel_panic_exits_non_zero_with_a_clear_message() {
    require_e2e();
    let work = work_dir("panic");
    let initrd = initramfs(&work, "echo c > /proc/sysrq-trigger\n");
    let mut vm = Vm::start(&guest_args("vmlinux", &initrd, &[]), None);
    let status = vm.wait_exit(BOOT_TIMEOUT);
    assert_eq!(status.code(), Some(1), "a panic is not a clean exit");
    assert!(
        vm.stderr()
            .contains("tidevm: guest crashed: the guest kernel panicked"),
        "stderr: {}",
        vm.stderr()
    );
}
