//! libvirt's `virsh save` and `virsh restore` of the same filled guest, for
//! the instant-restore rows' peer column. libvirt is installed here, in the
//! bench's own set-up, never for the tests: Debian's packages, the users and
//! groups its QEMU driver expects, and its daemons started by hand (a
//! container has no systemd).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

const URI: &str = "qemu:///system";
const SOCKET: &str = "/run/libvirt/libvirt-sock";

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// libvirt installed and its daemons running; `Err` says why not.
pub(super) fn set_up() -> anyhow::Result<()> {
    // SAFETY: getuid cannot fail.
    let root = unsafe { libc::getuid() } == 0;
    if !have("virsh") || !have("libvirtd") {
        if !root {
            bail!("libvirt is not installed (the bench installs it only as root)");
        }
        eprintln!("installing libvirt from Debian for the peer rows");
        run(Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "libvirt-daemon",
                "libvirt-daemon-driver-qemu",
                "libvirt-clients",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if Path::new(SOCKET).exists() && run(Command::new("virsh").args(["-c", URI, "version"])).is_ok()
    {
        return Ok(());
    }
    if !root {
        bail!("libvirtd is not running");
    }
    // What its QEMU driver expects to exist (a package's scripts would make them).
    let _ = Command::new("groupadd").args(["-r", "kvm"]).output();
    let _ = Command::new("groupadd")
        .args(["-r", "libvirt-qemu"])
        .output();
    let _ = Command::new("useradd")
        .args(["-r", "-g", "libvirt-qemu", "-G", "kvm", "libvirt-qemu"])
        .output();
    for d in ["/var/log/libvirt", "/run/libvirt", "/var/lib/libvirt/qemu"] {
        std::fs::create_dir_all(d)?;
    }
    run(Command::new("virtlogd").arg("-d"))?;
    run(Command::new("libvirtd").arg("-d"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while run(Command::new("virsh").args(["-c", URI, "version"])).is_err() {
        if Instant::now() > deadline {
            bail!("libvirtd did not answer within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A libvirt domain booting the test guest: `ram` MiB, `fill` MiB written.
pub(super) struct Domain {
    name: String,
    dir: PathBuf,
    serial: PathBuf,
}

impl Domain {
    pub(super) fn start(guest: &Path, ram: u32, fill: u32) -> anyhow::Result<Domain> {
        let name = format!("qemu-migrate-bench-{}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        // QEMU runs as libvirt-qemu: it must reach the kernel and the log.
        let kernel = dir.join("guest.elf");
        std::fs::copy(guest, &kernel)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
        std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644))?;
        let serial = dir.join("serial.log");
        let xml = format!(
            "<domain type='qemu'>\n  <name>{name}</name>\n  <memory unit='MiB'>{ram}</memory>\n  \
             <vcpu>1</vcpu>\n  <os><type arch='x86_64' machine='pc'>hvm</type>\
             <kernel>{}</kernel><cmdline>fill={fill}</cmdline></os>\n  <devices>\n    \
             <serial type='file'><source path='{}'/></serial>\n    \
             <memballoon model='none'/>\n  </devices>\n</domain>\n",
            kernel.display(),
            serial.display()
        );
        let xml_path = dir.join("domain.xml");
        std::fs::write(&xml_path, xml)?;
        run(Command::new("virsh")
            .args(["-c", URI, "create"])
            .arg(&xml_path))?;
        let d = Domain { name, dir, serial };
        d.wait_tick(1)?;
        Ok(d)
    }

    /// Waits until the guest has printed `tick N` or a later one.
    fn wait_tick(&self, n: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let text = std::fs::read_to_string(&self.serial).unwrap_or_default();
            if text.lines().filter_map(test_guest::tick).any(|t| t >= n) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the libvirt guest printed no tick {n}: {text:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `virsh save` (the guest stops) then `virsh restore` (it runs again):
    /// the two times and the save file's size.
    pub(super) fn save_restore(&self) -> anyhow::Result<(Duration, Duration, u64)> {
        let file = self.dir.join("virsh.save");
        let start = Instant::now();
        run(Command::new("virsh")
            .args(["-c", URI, "save", &self.name])
            .arg(&file))?;
        let save = start.elapsed();
        let bytes = std::fs::metadata(&file)?.len();
        let start = Instant::now();
        run(Command::new("virsh")
            .args(["-c", URI, "restore"])
            .arg(&file))?;
        let restore = start.elapsed();
        let _ = std::fs::remove_file(&file);
        Ok((save, restore, bytes))
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = Command::new("virsh")
            .args(["-c", URI, "destroy", &self.name])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
