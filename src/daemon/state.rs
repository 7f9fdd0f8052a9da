//! What the daemon's parts share: its [`Phase`], its [`Log`], the run's token, and [`Daemon`],
//! the state the HTTP handlers ([`super::http`]) and the signal handlers both use.

use crate::config::Config;
use crate::runtime::metrics::{MetricsMsg, Shared};
use crate::runtime::supervisor::SupervisorMsg;
use crate::runtime::Status;
use anyhow::{bail, Context, Result};
use ractor::ActorRef;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where the daemon is in its life (the run's own pause flag comes from the runtime's status).
#[derive(Clone, Debug, PartialEq)]
pub enum Phase {
    Running,
    Stopping,
    Finished,
    Failed(String),
}

/// The daemon's log: a file opened for appending (reopened on SIGHUP), or stdout.
pub struct Log {
    path: Option<PathBuf>,
    file: Mutex<Option<std::fs::File>>,
}

impl Log {
    pub fn open(path: Option<PathBuf>) -> Result<Log> {
        let file = match &path {
            Some(p) => Some(open_append(p)?),
            None => None,
        };
        Ok(Log { path, file: Mutex::new(file) })
    }

    /// Close and reopen the file (after logrotate moved it away).
    pub fn reopen(&self) -> Result<()> {
        if let Some(p) = &self.path {
            let f = open_append(p)?;
            *self.file.lock().expect("log lock") = Some(f);
        }
        Ok(())
    }

    pub fn say(&self, line: impl AsRef<str>) {
        let text = format!("{} {}\n", utc_now(), line.as_ref());
        let mut g = self.file.lock().expect("log lock");
        match g.as_mut() {
            Some(f) => {
                let _ = f.write_all(text.as_bytes());
                let _ = f.flush();
            }
            None => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(text.as_bytes());
                let _ = out.flush();
            }
        }
    }
}

fn open_append(p: &Path) -> Result<std::fs::File> {
    if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::OpenOptions::new().create(true).append(true).open(p).with_context(|| format!("opening log file {}", p.display()))
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for now.
pub fn utc_now() -> String {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let (secs, ms) = (d.as_secs() as i64, d.subsec_millis());
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

/// The control token: `daemon.token_file` if set (an unreadable or empty file is an error: the
/// daemon refuses to start rather than run without the protection it was configured with),
/// else `TAPROOT_TOKEN` if non-empty, else none (control disabled). Also returns a warning
/// when the file is readable by group or others.
pub fn read_token(cfg: &Config) -> Result<(Option<String>, Option<String>)> {
    if let Some(path) = &cfg.daemon.token_file {
        let text = crate::userfile::read_to_string(path, "daemon.token_file", crate::userfile::TEXT_MAX)?;
        let token = text.trim().to_string();
        if token.is_empty() {
            bail!("daemon.token_file: {} is empty", path.display());
        }
        let mut warning = None;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(m) = std::fs::metadata(path) {
                if m.permissions().mode() & 0o077 != 0 {
                    warning = Some(format!("warning: token file {} is readable by group or others (chmod 600 it)", path.display()));
                }
            }
        }
        return Ok((Some(token), warning));
    }
    Ok((std::env::var("TAPROOT_TOKEN").ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()), None))
}

/// What the runtime said when asked for its status.
#[derive(Clone, Debug)]
pub enum Live {
    Status(Status),
    /// The supervisor is rebuilding the pipeline from a checkpoint.
    Restarting,
    /// No answer in time (a long checkpoint or growth holds the scheduler); use the cached one.
    NoAnswer,
    /// The run has ended.
    Ended,
}

/// Everything the HTTP handlers and the signal handlers share.
pub struct Daemon {
    pub cfg: Config,
    /// This process's place in the run (`dist::init`'s).
    pub topo: crate::dist::Topology,
    pub supervisor: ActorRef<SupervisorMsg>,
    pub metrics: ActorRef<MetricsMsg>,
    pub prometheus: metrics_exporter_prometheus::PrometheusHandle,
    pub shared: Arc<Shared>,
    pub token: Mutex<Option<String>>,
    pub phase: Mutex<Phase>,
    /// The newest status answered by the runtime (kept for after the run ends).
    pub last_status: Mutex<Option<Status>>,
    pub log: Arc<Log>,
    /// Wakes the main task when a stop is requested after the run ended (ends the linger).
    pub stop: tokio::sync::Notify,
    pub listen: Mutex<String>,
}

impl Daemon {
    pub fn phase(&self) -> Phase {
        self.phase.lock().expect("phase lock").clone()
    }

    /// The runtime's status now (and it becomes the cached one).
    pub async fn live_status(&self) -> Live {
        if !matches!(self.phase(), Phase::Running | Phase::Stopping) {
            return Live::Ended;
        }
        match self.supervisor.call(SupervisorMsg::Status, Some(Duration::from_secs(10))).await {
            Ok(ractor::rpc::CallResult::Success(Some(st))) => {
                *self.last_status.lock().expect("status lock") = Some(st.clone());
                Live::Status(st)
            }
            Ok(ractor::rpc::CallResult::Success(None)) => Live::Restarting,
            _ => Live::NoAnswer,
        }
    }

    /// Stop: finish the step, checkpoint, exit 0 (or, after the run ended, exit now).
    pub fn request_stop(&self, why: &str) {
        let mut ph = self.phase.lock().expect("phase lock");
        match *ph {
            Phase::Running => {
                *ph = Phase::Stopping;
                drop(ph);
                self.log.say(format!("stop requested ({why}): finishing the step, then checkpoint and exit"));
                let _ = self.metrics.cast(MetricsMsg::State("stopping", None));
                let _ = self.supervisor.cast(SupervisorMsg::RequestStop);
            }
            Phase::Stopping => {}
            Phase::Finished | Phase::Failed(_) => {
                drop(ph);
                self.log.say(format!("stop requested ({why}) after the run ended: exiting"));
                self.stop.notify_one();
            }
        }
    }

    /// Force the stop: the run stops at the next micro-batch boundary, dropping the step in
    /// progress, checkpoints its last completed step and fails (exit 1, without lingering).
    pub fn force_stop(&self, why: &str) {
        let mut ph = self.phase.lock().expect("phase lock");
        match *ph {
            Phase::Running | Phase::Stopping => {
                *ph = Phase::Stopping;
                drop(ph);
                self.log.say(format!("forced stop ({why}): stopping at the next micro-batch boundary"));
                let _ = self.metrics.cast(MetricsMsg::State("stopping", None));
                let _ = self.supervisor.cast(SupervisorMsg::ForceStop);
                // A stored permit: the linger after the run ends is skipped.
                self.stop.notify_one();
            }
            Phase::Finished | Phase::Failed(_) => {
                drop(ph);
                self.stop.notify_one();
            }
        }
    }

    pub fn reload(&self) {
        if let Err(e) = self.log.reopen() {
            eprintln!("warning: SIGHUP: {e:#}");
        }
        if self.cfg.daemon.token_file.is_some() {
            match read_token(&self.cfg) {
                Ok((t, w)) => {
                    *self.token.lock().expect("token lock") = t;
                    if let Some(w) = w {
                        self.log.say(w);
                    }
                }
                Err(e) => {
                    // The token file is gone or unreadable: deny all control until it is back
                    // (keeping the old token would honour a token the operator meant to revoke).
                    *self.token.lock().expect("token lock") = None;
                    self.log.say(format!("warning: SIGHUP: {e:#}: control is disabled (403) until a token file is in place and SIGHUP"));
                }
            }
        }
        self.log.say("SIGHUP: log file reopened, token file re-read");
    }
}
