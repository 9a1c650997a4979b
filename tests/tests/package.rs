//! The install on a gateway, checked with the tools an integrator uses: `cargo deb` packages the
//! binary that `.ci/run` has already built, `dpkg-deb` reads the package's files and control
//! data, and `systemd-analyze` verifies the unit and rates its sandbox. A test whose tool is not
//! installed says so and returns (`.ci/run` installs cargo-deb; systemd-analyze and dpkg-deb
//! come with Debian).

use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The unit as shipped.
const UNIT: &str = include_str!("../../systemd/gatewayd.service");
/// Where the unit points at the binary.
const INSTALLED_BIN: &str = "/usr/bin/gatewayd";
/// Highest `systemd-analyze security` exposure accepted (0 = fully sandboxed, 10 = none).
const MAX_EXPOSURE: f64 = 2.5;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the e2e crate sits in the workspace")
        .to_path_buf()
}

/// Runs `program args`; `None` when the program is not installed.
fn run(program: &str, args: &[&str]) -> Option<Output> {
    run_with(program, args, &[])
}

/// Runs `program args` with extra environment variables; `None` when it is not installed.
fn run_with(program: &str, args: &[&str], env: &[(&str, &Path)]) -> Option<Output> {
    let mut command = Command::new(program);
    command.args(args).current_dir(workspace());
    for (k, v) in env {
        command.env(k, v);
    }
    match command.output() {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("cannot run {program}: {e}"),
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a tool that must succeed and returns its stdout.
fn stdout_of(program: &str, args: &[&str]) -> Result<String> {
    let out = run(program, args).with_context(|| format!("{program} vanished"))?;
    ensure!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}",
        out.status,
        text(&out)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// True when `program version_args` runs; otherwise prints why the test is skipped.
fn installed(program: &str, version_args: &[&str], test: &str) -> bool {
    match run(program, version_args) {
        Some(out) if out.status.success() => true,
        _ => {
            eprintln!(
                "SKIP {test}: `{program} {}` is not available",
                version_args.join(" ")
            );
            false
        }
    }
}

/// The directives the rest of the install relies on, read without any tool.
#[test]
fn unit_has_the_service_contract() {
    let lines: Vec<&str> = UNIT.lines().map(str::trim).collect();
    for want in [
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30s",
        "ExecStart=/usr/bin/gatewayd run --config /etc/gatewayd/gatewayd.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "RestartPreventExitStatus=64",
        "User=gatewayd",
        "SupplementaryGroups=dialout",
        "StateDirectory=gatewayd",
        "ConfigurationDirectory=gatewayd",
        "DevicePolicy=closed",
        "DeviceAllow=char-ttyS rw",
        "DeviceAllow=char-ttyUSB rw",
        "DeviceAllow=char-ttyACM rw",
        "CapabilityBoundingSet=",
        "Environment=MALLOC_ARENA_MAX=2",
        "WantedBy=multi-user.target",
    ] {
        assert!(lines.contains(&want), "the unit lacks `{want}`");
    }
    for banned in ["PrivateDevices=", "DynamicUser=", "ExecStartPre="] {
        assert!(
            !lines.iter().any(|l| l.starts_with(banned)),
            "the unit must not set {banned} (see the comments in the unit)"
        );
    }
}

/// `systemd-analyze verify` prints nothing for the unit. The shipped unit names
/// /usr/bin/gatewayd, which verify requires to exist, so a copy points at the built binary.
#[test]
fn unit_verifies_clean() -> Result<()> {
    if !installed("systemd-analyze", &["--version"], "unit_verifies_clean") {
        return Ok(());
    }
    let bin = e2e::bin("gatewayd")?;
    ensure!(
        UNIT.contains(INSTALLED_BIN),
        "the unit does not run {INSTALLED_BIN}"
    );
    let dir = tempfile::tempdir()?;
    let unit = dir.path().join("gatewayd.service");
    std::fs::write(
        &unit,
        UNIT.replace(INSTALLED_BIN, bin.to_str().context("binary path")?),
    )?;
    let out = run("systemd-analyze", &["verify", unit.to_str().unwrap()]).unwrap();
    let said = text(&out);
    eprintln!("systemd-analyze verify: {}", out.status);
    // verify exits 0 on warnings such as unknown keys: any output at all is a finding.
    ensure!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify is not clean ({}):\n{said}",
        out.status
    );
    Ok(())
}

/// `systemd-analyze security --offline=yes` rates the unit's exposure at most 2.5.
#[test]
fn unit_exposure_is_low() -> Result<()> {
    let test = "unit_exposure_is_low";
    if !installed("systemd-analyze", &["--version"], test) {
        return Ok(());
    }
    let help = stdout_of("systemd-analyze", &["--help"])?;
    if !help.contains("--offline") {
        eprintln!("SKIP {test}: this systemd-analyze has no --offline (systemd < 252)");
        return Ok(());
    }
    let unit = workspace().join("systemd/gatewayd.service");
    let out = run(
        "systemd-analyze",
        &[
            "security",
            "--offline=yes",
            "--no-pager",
            unit.to_str().unwrap(),
        ],
    )
    .unwrap();
    let said = text(&out);
    eprintln!("{said}");
    ensure!(
        out.status.success(),
        "systemd-analyze security failed ({}):\n{said}",
        out.status
    );
    let level = said
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for gatewayd.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .context("no overall exposure line")?;
    let level: f64 = level
        .parse()
        .with_context(|| format!("exposure '{level}'"))?;
    ensure!(
        level <= MAX_EXPOSURE,
        "exposure {level} is above {MAX_EXPOSURE}:\n{said}"
    );
    Ok(())
}

/// The package `cargo deb -p gatewayd` builds: files, modes, conffiles, dependencies, and
/// maintainer scripts that create the user, enable without starting, and purge the state.
#[test]
fn debian_package() -> Result<()> {
    let test = "debian_package";
    if !installed(&cargo(), &["deb", "--version"], test)
        || !installed("dpkg-deb", &["--version"], test)
    {
        return Ok(());
    }
    // Package the binary this test run was built with instead of building the release profile
    // just for this check: cargo-deb takes target/release/gatewayd from a scratch target
    // directory that holds a copy of it (and keeps its own scratch files out of target/).
    let target = tempfile::tempdir()?;
    std::fs::create_dir(target.path().join("release"))?;
    let built_size = std::fs::copy(
        e2e::bin("gatewayd")?,
        target.path().join("release/gatewayd"),
    )?;
    let out_dir = target.path().join("out");
    let out = run_with(
        &cargo(),
        &[
            "deb",
            "-p",
            "gatewayd",
            "--no-build",
            "--fast",
            "--locked",
            "-o",
            out_dir.to_str().unwrap(),
        ],
        &[("CARGO_TARGET_DIR", target.path())],
    )
    .unwrap();
    ensure!(
        out.status.success(),
        "cargo deb failed ({}):\n{}",
        out.status,
        text(&out)
    );
    let written: Vec<PathBuf> = std::fs::read_dir(&out_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    let with_extension = |ext: &str| {
        written
            .iter()
            .find(|p| p.extension().is_some_and(|x| x == ext))
            .with_context(|| format!("cargo deb wrote no .{ext}: {written:?}"))
    };
    let deb = with_extension("deb")?;
    // Debug symbols go to the -dbgsym package, not onto the gateway's flash.
    with_extension("ddeb")?;
    let deb_s = deb.to_str().unwrap();

    // Files and their modes (`dpkg-deb -c`: mode owner size date time path).
    let listing = stdout_of("dpkg-deb", &["-c", deb_s])?;
    eprintln!("{listing}");
    let mode_of = |path: &str| {
        listing
            .lines()
            .find(|l| l.ends_with(&format!(" .{path}")))
            .and_then(|l| l.split_whitespace().next())
    };
    for (path, mode) in [
        ("/usr/bin/gatewayd", "-rwxr-xr-x"),
        ("/usr/lib/systemd/system/gatewayd.service", "-rw-r--r--"),
        ("/etc/gatewayd/gatewayd.toml", "-rw-r-----"),
        ("/usr/share/doc/gatewayd/README.md", "-rw-r--r--"),
        (
            "/usr/share/doc/gatewayd/examples/gatewayd.example.toml",
            "-rw-r--r--",
        ),
        ("/usr/share/doc/gatewayd/copyright", "-rw-r--r--"),
    ] {
        assert_eq!(mode_of(path), Some(mode), "{path} in\n{listing}");
    }
    assert!(
        !listing.contains("/var/lib/gatewayd"),
        "the state directory belongs to systemd, not to the package"
    );

    // Control fields.
    let field = |name: &str| stdout_of("dpkg-deb", &["-f", deb_s, name]);
    assert_eq!(field("Package")?.trim(), "gatewayd");
    assert_eq!(field("Section")?.trim(), "net");
    let depends = field("Depends")?;
    for want in ["adduser", "procps", "libc6"] {
        assert!(depends.contains(want), "Depends lacks {want}: {depends}");
    }
    let conffiles = stdout_of("dpkg-deb", &["-I", deb_s, "conffiles"])?;
    assert_eq!(
        conffiles.lines().collect::<Vec<_>>(),
        ["/etc/gatewayd/gatewayd.toml"]
    );

    // Maintainer scripts.
    let script = |name: &str| stdout_of("dpkg-deb", &["-I", deb_s, name]);
    let postinst = script("postinst")?;
    for want in [
        "adduser --quiet --system --group --home /var/lib/gatewayd --no-create-home",
        "adduser --quiet gatewayd dialout",
        "dpkg-statoverride --update --add root gatewayd 0640 /etc/gatewayd/gatewayd.toml",
        "deb-systemd-helper enable gatewayd.service",
        "deb-systemd-invoke try-restart gatewayd.service",
    ] {
        assert!(
            postinst.contains(want),
            "postinst lacks `{want}`:\n{postinst}"
        );
    }
    assert!(
        !postinst.contains("deb-systemd-invoke start") && !postinst.contains("#DEBHELPER#"),
        "postinst must not start the unit on install, and the debhelper token must be filled:\n{postinst}"
    );
    let prerm = script("prerm")?;
    assert!(
        prerm.contains(r#"[ "$1" = remove ]"#) && prerm.contains("deb-systemd-invoke stop"),
        "prerm stops the unit on removal only:\n{prerm}"
    );
    let postrm = script("postrm")?;
    let rm = postrm
        .find("rm -rf /var/lib/gatewayd")
        .context("postrm never deletes the state")?;
    let branch = postrm[..rm]
        .rfind("if [ \"$1\" = ")
        .context("postrm deletes the state unconditionally")?;
    assert!(
        postrm[branch..rm].starts_with("if [ \"$1\" = \"purge\" ]"),
        "the state must go on purge only:\n{postrm}"
    );

    // The packaged unit and configuration are the ones in the tree, and the packaged (stripped)
    // binary accepts the packaged configuration.
    let root = tempfile::tempdir()?;
    stdout_of("dpkg-deb", &["-x", deb_s, root.path().to_str().unwrap()])?;
    let packaged = |p: &str| std::fs::read(root.path().join(p));
    assert_eq!(
        packaged("usr/lib/systemd/system/gatewayd.service")?,
        UNIT.as_bytes()
    );
    assert_eq!(
        packaged("etc/gatewayd/gatewayd.toml")?,
        std::fs::read(workspace().join("gatewayd/gatewayd.example.toml"))?
    );
    let shipped_size = std::fs::metadata(root.path().join("usr/bin/gatewayd"))?.len();
    assert!(
        shipped_size < built_size / 2,
        "the packaged binary is not stripped ({shipped_size} of {built_size} bytes)"
    );
    let checked = stdout_of(
        root.path().join("usr/bin/gatewayd").to_str().unwrap(),
        &[
            "check-config",
            root.path()
                .join("etc/gatewayd/gatewayd.toml")
                .to_str()
                .unwrap(),
        ],
    )?;
    assert!(checked.contains(": ok"), "{checked}");
    Ok(())
}
