//! #26: the image users run, as `scripts/image` builds it (scripts/test
//! runs it first): its entrypoint is a static x86-64 binary that, run by
//! `buildah run --isolation chroot` as user 65532, answers `--version` and
//! writes credentials that log in to the suite's real OpenBao and
//! PostgreSQL; the arm64 binary is a static aarch64 executable answering
//! under qemu; and one version everywhere.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{Env, Ttls};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const IMAGE: &str = "ghcr.io/leasehold/leasehold";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `buildah` (vfs storage, as scripts/image) with `args`: its stdout.
fn buildah(args: &[&str]) -> String {
    let out = Command::new("buildah").arg("--storage-driver").arg("vfs").args(args).output();
    let out = out.unwrap_or_else(|e| panic!("buildah: {e} (scripts/image installs it)"));
    assert!(out.status.success(), "buildah {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// An ELF file's machine (`e_machine`) and whether it asks for an
/// interpreter (`PT_INTERP`: dynamically linked).
fn elf(path: &Path) -> (u16, bool) {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&b[..5], b"\x7fELF\x02", "{}: not a 64-bit ELF file", path.display());
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let phoff = u64::from_le_bytes(b[32..40].try_into().unwrap()) as usize;
    let (size, count) = (u16_at(54) as usize, u16_at(56) as usize);
    let interp = (0..count).any(|i| u32::from_le_bytes(b[phoff + i * size..][..4].try_into().unwrap()) == 3);
    (u16_at(18), interp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_the_agent_as_65532_against_openbao_and_postgres() {
    let archive = root().join(format!("target/image/leasehold-{VERSION}-linux-amd64.oci.tar"));
    assert!(archive.exists(), "{} is missing: run scripts/image (scripts/test does)", archive.display());
    let ctr = buildah(&["from", "--pull-never", &format!("oci-archive:{}", archive.display())]);
    let config: serde_json::Value = serde_json::from_str(&buildah(&["inspect", "--type", "container", &ctr])).unwrap();
    let oci = &config["OCIv1"]["config"];
    assert_eq!(oci["User"], "65532:65532");
    assert_eq!(oci["Labels"]["org.opencontainers.image.version"], VERSION);
    assert_eq!(oci["Entrypoint"][0], "/usr/local/bin/leasehold");
    let rootfs = PathBuf::from(buildah(&["mount", &ctr]));
    assert_eq!(elf(&rootfs.join("usr/local/bin/leasehold")), (0x3e, false), "a static x86-64 entrypoint");
    assert!(rootfs.join("etc/ssl/certs/ca-certificates.crt").exists(), "the CA bundle");

    let run = |args: &[&str]| {
        let mut all = vec!["run", "--isolation", "chroot", "--user", "65532:65532"];
        all.extend_from_slice(args);
        Command::new("buildah").args(["--storage-driver", "vfs"]).args(&all).output().unwrap()
    };
    let version = run(&[&ctr, "--", "/usr/local/bin/leasehold", "--version"]);
    assert_eq!(String::from_utf8_lossy(&version.stdout).trim(), format!("leasehold {VERSION}"), "{version:?}");

    // The agent inside, once, against the suite's OpenBao and PostgreSQL
    // (chroot isolation shares the host's network); its directory mounted
    // and open to user 65532.
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let dir = env.secrets().parent().unwrap().to_path_buf();
    std::fs::create_dir_all(env.secrets()).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(env.secrets(), std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(env.token_path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = env.config("", "");
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let volume = format!("{0}:{0}", dir.display());
    let once =
        run(&["-v", &volume, &ctr, "--", "/usr/local/bin/leasehold", "agent", "--once", "-c", cfg.to_str().unwrap()]);
    buildah(&["rm", &ctr]);
    assert!(once.status.success(), "agent --once in the image: {}", String::from_utf8_lossy(&once.stderr));
    let creds = env.read_json("db.json").expect("the image's agent wrote db.json");
    let (user, password) = (creds["username"].as_str().unwrap(), creds["password"].as_str().unwrap());
    let login = Command::new("psql")
        .args([
            &format!("host=127.0.0.1 port={} user={user} dbname=postgres sslmode=disable", env.pg.port),
            "-Atc",
            "SELECT current_user",
        ])
        .env("PGPASSWORD", password)
        .output()
        .expect("psql (scripts/test installs PostgreSQL's client)");
    assert_eq!(String::from_utf8_lossy(&login.stdout).trim(), user, "{}", String::from_utf8_lossy(&login.stderr));
}

#[test]
fn the_arm64_binary_is_static_aarch64_and_answers_under_qemu() {
    let bin = root().join(format!("target/release-artifacts/leasehold-{VERSION}-linux-arm64"));
    assert!(bin.exists(), "{} is missing: run scripts/image (scripts/test does)", bin.display());
    assert_eq!(elf(&bin), (0xb7, false), "a static aarch64 executable");
    let out = Command::new("qemu-aarch64-static").arg(&bin).arg("--version").output();
    let out = out.unwrap_or_else(|e| panic!("qemu-aarch64-static: {e} (scripts/image installs qemu-user-static)"));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("leasehold {VERSION}"), "{out:?}");
}

/// The Cargo version is the chart's `appVersion` and image tag, the
/// injector's default image, and what the README, the docs and the
/// manifests name; the Dockerfile's image holds what scripts/image's does.
#[test]
fn one_version_everywhere() {
    let read = |p: &str| std::fs::read_to_string(root().join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let reference = format!("{IMAGE}:{VERSION}");
    let chart = read("charts/leasehold/Chart.yaml");
    assert!(chart.contains(&format!("appVersion: \"{VERSION}\"")), "Chart.yaml's appVersion is not {VERSION}");
    let values = read("charts/leasehold/values.yaml");
    assert!(values.contains(&format!("repository: {IMAGE}\n")) && values.contains(&format!("tag: \"{VERSION}\"")));
    let help = Command::new(env!("CARGO_BIN_EXE_leasehold")).args(["injector", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains(&format!("[default: {reference}]")), "injector --image");
    for doc in ["README.md", "docs/kubernetes.md", "docs/release.md", "deploy/kubernetes/deployment.yaml"] {
        let text = read(doc);
        assert!(text.contains(&reference), "{doc} does not name {reference}");
        // `$v`: a shell variable in release.md's commands.
        for line in text.lines().filter(|l| l.contains("leasehold/leasehold:") && !l.contains("leasehold:$v")) {
            assert!(line.contains(&reference), "{doc} names another version: {line}");
        }
    }
    let script = read("scripts/image");
    assert!(script.contains(&format!("image=${{LEASEHOLD_IMAGE:-{IMAGE}}}")), "scripts/image's image name");
    // The Dockerfile cannot be built here (no registry for its bases):
    // its final stage is held to scripts/image's layout instead.
    let dockerfile = read("deploy/Dockerfile");
    let last = dockerfile.rsplit("\nFROM ").next().unwrap();
    assert!(last.starts_with("scratch"), "the Dockerfile's image is FROM scratch");
    for wanted in [
        "/usr/local/bin/leasehold",
        "/etc/ssl/certs/ca-certificates.crt",
        "USER 65532:65532",
        "EXPOSE 9102",
        "ENTRYPOINT [\"/usr/local/bin/leasehold\"]",
    ] {
        assert!(last.contains(wanted), "the Dockerfile's final stage lacks {wanted}");
    }
    for from in dockerfile.lines().filter(|l| l.starts_with("FROM ") && !l.starts_with("FROM scratch")) {
        assert!(from.contains("docker.io/") || from.contains("gcr.io/"), "a base image not fully qualified: {from}");
    }
}
