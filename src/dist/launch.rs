//! The command lines that start a run's processes (`taproot launch`): `mpirun` or, inside a
//! Slurm allocation, `srun`, printed quoted for a POSIX shell.

/// The command line that starts every process of `cfg`'s run: `mpirun -np N [--host
/// h1:n1,…] taproot COMMAND --config F [--set …]` (COMMAND: `train` or `daemon`), or under Slurm (`slurm`) the `srun` line to run
/// inside the allocation. N = `parallel.data × parallel.pipeline`; on several hosts each runs
/// `parallel.processes_per_host` (default: N / hosts, rounded up).
pub fn launch_line(
    cfg: &crate::config::Config,
    exe: &std::path::Path,
    command: &str,
    config: &std::path::Path,
    sets: &[String],
    resume: bool,
    slurm: bool,
) -> Vec<String> {
    let p = &cfg.parallel;
    let n = p.data * p.pipeline;
    let per_host = p.processes_per_host.unwrap_or_else(|| n.div_ceil(p.hosts.len().max(1)));
    let mut line: Vec<String> = if slurm {
        let mut l = vec!["srun".to_string(), format!("--ntasks={n}")];
        if p.processes_per_host.is_some() || !p.hosts.is_empty() {
            l.push(format!("--ntasks-per-node={per_host}"));
        }
        l
    } else {
        let mut l = vec!["mpirun".to_string(), "-np".to_string(), n.to_string()];
        if !p.hosts.is_empty() {
            l.push("--host".into());
            l.push(p.hosts.iter().map(|h| format!("{h}:{per_host}")).collect::<Vec<_>>().join(","));
        }
        l
    };
    line.push(exe.display().to_string());
    line.push(command.into());
    line.push("--config".into());
    line.push(config.display().to_string());
    for s in sets {
        line.push("--set".into());
        line.push(s.clone());
    }
    if resume {
        line.push("--resume".into());
    }
    line
}

/// One word quoted for a POSIX shell: as it is when it has only safe characters, else in single
/// quotes (a single quote inside becomes `'\''`).
pub fn shell_word(w: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if !w.is_empty() && w.chars().all(safe) {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

/// A command line as a POSIX shell reads it back: every word quoted where needed.
pub fn shell_line(words: &[String]) -> String {
    words.iter().map(|w| shell_word(w)).collect::<Vec<_>>().join(" ")
}

/// `taproot launch`: print the line that starts every process of `cfg`'s run with `command`,
/// then run it here (unless `dry_run`) and fail if it fails. Inside a Slurm allocation the line
/// is `srun …`, run here like `mpirun` elsewhere, so that a batch script's `taproot launch` is
/// the job's work and its exit status.
#[allow(clippy::too_many_arguments)]
pub fn launch_command(
    cfg: &crate::config::Config,
    config: &std::path::Path,
    set: &[String],
    command: &str,
    resume: bool,
    dry_run: bool,
    launcher_args: Vec<String>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let exe = std::env::current_exe().context("finding the taproot binary to launch")?;
    let slurm = std::env::var_os("SLURM_JOB_ID").is_some();
    let mut line = launch_line(cfg, &exe, command, config, set, resume, slurm);
    // The launcher's own options go right after its name.
    line.splice(1..1, launcher_args);
    // Quoted for a POSIX shell, so that the printed line runs as it is when pasted.
    println!("{}", shell_line(&line));
    if dry_run {
        return Ok(());
    }
    let hint = if slurm {
        "is this a Slurm allocation with srun on the PATH? (run `taproot launch --dry-run` to print the line)"
    } else {
        "is an MPI launcher installed? Debian: openmpi-bin"
    };
    let status =
        std::process::Command::new(&line[0]).args(&line[1..]).status().with_context(|| format!("starting {} ({hint})", line[0]))?;
    if !status.success() {
        anyhow::bail!("the launched run failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_are_quoted_as_a_shell_reads_them_back() {
        assert_eq!(shell_word("run.seed=3"), "run.seed=3");
        assert_eq!(shell_word(r#"parallel.hosts=["a","b"]"#), r#"'parallel.hosts=["a","b"]'"#);
        assert_eq!(shell_word("it's"), r#"'it'\''s'"#);
        assert_eq!(shell_word(""), "''");
        assert_eq!(shell_word("a b"), "'a b'");
        // The shell reads the quoted line back as the same words.
        let words: Vec<String> =
            ["mpirun", "--set", r#"parallel.hosts=["a","b"]"#, "it's $HOME", "x*"].iter().map(|s| s.to_string()).collect();
        let out = std::process::Command::new("sh").arg("-c").arg(format!("printf '%s\\n' {}", shell_line(&words))).output();
        if let Ok(o) = out {
            assert_eq!(String::from_utf8_lossy(&o.stdout).lines().collect::<Vec<_>>(), words);
        }
    }
}
