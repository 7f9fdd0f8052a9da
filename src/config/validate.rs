//! [`Config::validate`]: the consistency checks that the types alone cannot express, each error
//! naming its key (the bounds of every key, the growth plan against the run, the memory the run
//! needs at its largest).

/// The most experts (routed, or shared) one MoE layer may have.
pub const MAX_EXPERTS: usize = 4096;
/// The longest context a model may have (`model.max_seq`; 16M positions).
pub const MAX_SEQ: usize = 1 << 24;
/// The most processes one run may have (`parallel.data` × `parallel.pipeline`).
pub const MAX_PROCESSES: usize = 1 << 20;

use super::{memory, valid_device_name, Config};
use crate::model::growth::GrowInit;
use anyhow::{bail, Result};

impl Config {
    /// Consistency checks that the types alone cannot express; each error names its key.
    pub fn validate(&self) -> Result<()> {
        let pos = |v: usize, key: &str| -> Result<()> {
            if v == 0 {
                bail!("`{key}` must be at least 1");
            }
            Ok(())
        };
        let n = &self.run.name;
        if n.is_empty() || n == "." || n == ".." || n.contains(['/', '\\']) || n.chars().any(|c| c.is_control()) {
            bail!("`run.name` must be a plain name (no path separators, `.` or `..`, control characters or NUL), got {n:?}");
        }
        if self.cuda.tf32 && self.precision.compute != crate::backend::Precision::Fp32 {
            bail!(
                "`cuda.tf32` = true contradicts `precision.compute` = \"{}\": drop `cuda.tf32` (the older spelling of `precision.compute = \"tf32\"`)",
                self.precision.compute
            );
        }
        match self.precision.storage {
            crate::backend::Precision::Fp32 => {}
            crate::backend::Precision::Bf16 if !self.on_cuda() => {}
            crate::backend::Precision::Bf16 => bail!(
                "`precision.storage` = \"bf16\" runs on the CPU backend only in this version (the CUDA backend stores activations in fp32): use \"fp32\" on `cuda:N` devices"
            ),
            p => bail!("`precision.storage` is \"fp32\" or \"bf16\", not \"{p}\" (tf32 is a compute precision only)"),
        }
        if self.on_cuda() && self.kernels.attention == crate::backend::Attention::Flash {
            if self.compute_precision() != crate::backend::Precision::Bf16 {
                bail!(
                    "`kernels.attention` = \"flash\" on CUDA runs on bf16 tensor cores: it needs `precision.compute` = \"bf16\", not \"{}\"",
                    self.compute_precision()
                );
            }
            let hs = self.model.channels.checked_div(self.model.heads).unwrap_or(0);
            if hs != 64 && hs != 128 {
                bail!(
                    "`kernels.attention` = \"flash\" on CUDA supports head sizes 64 and 128; `model.channels` / `model.heads` = {} / {} = {hs}",
                    self.model.channels,
                    self.model.heads
                );
            }
        }
        if self.run.steps == 0 {
            bail!("`run.steps` must be at least 1");
        }
        match (self.data.dir.as_os_str().is_empty(), self.data.sources.is_empty()) {
            (true, true) => bail!("`data.dir` is missing: `[data]` needs `dir` (a folder of shards) or `[[data.sources]]` (a mixture)"),
            (false, false) => bail!("`[data]` has both `dir` and `[[data.sources]]`: give one (a mixture lists every folder)"),
            _ => {}
        }
        let mut names = std::collections::HashSet::new();
        for (i, (name, _, w)) in self.data.folders().into_iter().enumerate() {
            let positive = w.is_finite() && w > 0.0;
            if !self.data.sources.is_empty() && !positive {
                bail!("`data.sources[{i}].weight` must be a positive number, got {w}");
            }
            if !names.insert(name.clone()) {
                bail!("`data.sources[{i}]`: two sources are called {name:?}; give each a distinct `name`");
            }
        }
        pos(self.data.batch_size, "data.batch_size")?;
        pos(self.data.seq_len, "data.seq_len")?;
        pos(self.data.micro_batches, "data.micro_batches")?;
        pos(self.parallel.data, "parallel.data")?;
        if !self.data.micro_batches.is_multiple_of(self.parallel.data) {
            bail!(
                "`data.micro_batches` ({}) must be a multiple of `parallel.data` ({}): the replicas split each step's micro-batches evenly",
                self.data.micro_batches,
                self.parallel.data
            );
        }
        pos(self.parallel.pipeline, "parallel.pipeline")?;
        match self.parallel.data.checked_mul(self.parallel.pipeline) {
            Some(n) if n <= MAX_PROCESSES => {}
            _ => bail!(
                "`parallel.data` × `parallel.pipeline` = {} × {} is more than {MAX_PROCESSES} processes",
                self.parallel.data,
                self.parallel.pipeline
            ),
        }
        if self.parallel.zero > 1 {
            bail!("`parallel.zero` = {}: ZeRO stage 0 or 1 (sharded optimizer state) is supported", self.parallel.zero);
        }
        if self.parallel.timeout_s > 86_400 {
            bail!("`parallel.timeout_s` must be at most a day (86400 s; 0: wait forever), got {}", self.parallel.timeout_s);
        }
        if self.parallel.collectives == super::Collectives::Nccl {
            if !cfg!(feature = "nccl") {
                bail!("`parallel.collectives` = \"nccl\" needs a build with the `nccl` feature (cargo build --release --features mpi,nccl); this one has only \"host\"");
            }
            if !self.on_cuda() {
                bail!("`parallel.collectives` = \"nccl\" sums gradients on CUDA devices: place the run on `cuda:N` (`placement.devices`) or use \"host\"");
            }
            let devices: std::collections::BTreeSet<&String> = self.placement.devices.iter().chain(self.placement.ends.iter()).collect();
            if devices.len() > 1 {
                bail!(
                    "`parallel.collectives` = \"nccl\" needs one device per process (one communicator per process), but `placement` lists {}: use \"host\", or one device per process and more processes",
                    devices.len()
                );
            }
        }
        if self.faults.stall_collectives_ms > 0 && self.parallel.collectives != super::Collectives::Nccl {
            bail!("`faults.stall_collectives_ms` holds NCCL's all-reduces: it needs `parallel.collectives` = \"nccl\"");
        }
        if self.parallel.processes_per_host == Some(0) {
            bail!("`parallel.processes_per_host` must be at least 1");
        }
        match crate::data::bpe::parse_name(&self.data.tokenizer) {
            Some(Err(e)) => bail!("`data.tokenizer`: {e:#}"),
            Some(Ok(_)) => {}
            None if matches!(self.data.tokenizer.as_str(), "bytes" | "gpt2") || self.data.tokenizer.starts_with("hf:") => {}
            None => bail!("`data.tokenizer` must be \"bytes\", \"gpt2\", \"bpe:N\" or \"hf:PATH\", got {:?}", self.data.tokenizer),
        }
        if let Some(v) = self.data.vocab_size {
            let of_name = crate::config::memory::vocab_of(&super::DataConfig { vocab_size: None, ..self.data.clone() });
            if v < 2 || (!self.data.tokenizer.starts_with("hf:") && v < of_name) {
                bail!("`data.vocab_size` = {v} is smaller than the {} tokenizer's {of_name} ids", self.data.tokenizer);
            }
        }
        pos(self.model.channels, "model.channels")?;
        pos(self.model.heads, "model.heads")?;
        if !self.model.channels.is_multiple_of(self.model.heads) {
            bail!("`model.heads` ({}) must divide `model.channels` ({})", self.model.heads, self.model.channels);
        }
        let m = &self.model;
        let kind = crate::model::kinds::spec(m.arch);
        for (set, key) in [
            (m.kv_heads.is_some(), "kv_heads"),
            (m.ffn_hidden.is_some(), "ffn_hidden"),
            (m.rope_theta.is_some(), "rope_theta"),
            (m.norm_eps.is_some(), "norm_eps"),
        ] {
            if set && !kind.takes_key(key) {
                bail!(
                    "`model.{key}` applies to the LLaMA block kinds; this config's `model.arch` is {:?} (set `model.arch = \"llama\"` or \"qwen3\", or remove the key)",
                    m.arch.name()
                );
            }
        }
        if kind.takes_key("kv_heads") {
            let kv = m.kv_heads.unwrap_or(m.heads);
            if kv == 0 || !m.heads.is_multiple_of(kv) {
                bail!("`model.kv_heads` ({kv}) must be at least 1 and divide `model.heads` ({})", m.heads);
            }
            if !(m.channels / m.heads).is_multiple_of(2) {
                bail!("rotary positions need an even head size: `model.channels` / `model.heads` = {} / {} is odd", m.channels, m.heads);
            }
            if m.ffn_hidden == Some(0) {
                bail!("`model.ffn_hidden` must be at least 1");
            }
            if m.rope_theta.is_some_and(|t| !(t.is_finite() && t > 1.0 && t <= 1e12)) {
                bail!("`model.rope_theta` must be a number in (1, 1e12], got {}", m.rope_theta.unwrap_or(0.0));
            }
            // ε only guards a division: models use 1e-6 to 1e-5; beyond 1 it changes the function.
            if m.norm_eps.is_some_and(|e| !(e.is_finite() && e > 0.0 && e <= 1.0)) {
                bail!("`model.norm_eps` must be a number in (0, 1], got {}", m.norm_eps.unwrap_or(0.0));
            }
        }
        if let Some(x) = &m.moe {
            if !kind.takes_key("moe") {
                bail!("`[model.moe]`: mixture-of-experts blocks have SwiGLU experts; set `model.arch` = \"llama\" or \"qwen3\"");
            }
            if x.experts > MAX_EXPERTS {
                bail!("`model.moe.experts` must be at most {MAX_EXPERTS}, got {}", x.experts);
            }
            if x.shared_experts > MAX_EXPERTS {
                bail!("`model.moe.shared_experts` must be at most {MAX_EXPERTS}, got {}", x.shared_experts);
            }
            if x.experts == 0 || x.top_k == 0 || x.top_k > x.experts {
                bail!("`model.moe.top_k` ({}) must be between 1 and `model.moe.experts` ({})", x.top_k, x.experts);
            }
            if x.expert_hidden == Some(0) {
                bail!("`model.moe.expert_hidden` must be at least 1");
            }
            // Both are small in practice (1e-4 to 1e-2); beyond 1 they swamp the language loss.
            if !(x.aux_loss.is_finite() && (0.0..=1.0).contains(&x.aux_loss)) {
                bail!("`model.moe.aux_loss` must be a number in [0, 1], got {}", x.aux_loss);
            }
            if !(x.bias_update_rate.is_finite() && (0.0..=1.0).contains(&x.bias_update_rate)) {
                bail!("`model.moe.bias_update_rate` must be a number in [0, 1], got {}", x.bias_update_rate);
            }
            let target = self.target_depth();
            if target > 0 && x.first_dense_layers >= target {
                bail!(
                    "`model.moe.first_dense_layers` ({}) makes every one of the model's {target} layers (`model.target_depth`) dense, so no layer has experts: lower it, or remove `[model.moe]`",
                    x.first_dense_layers
                );
            }
            if x.routing == crate::model::moe::Routing::Sigmoid && self.parallel.data > 1 {
                bail!("`model.moe.routing` = \"sigmoid\" balances each replica's bias by its own load, which would make data-parallel replicas diverge: use `softmax` with `parallel.data` > 1");
            }
        }
        if self.max_seq() > MAX_SEQ {
            bail!("`model.max_seq` ({}) must be at most {MAX_SEQ} positions", self.max_seq());
        }
        if self.max_seq() < self.data.seq_len {
            bail!("`model.max_seq` ({}) is shorter than `data.seq_len` ({})", self.max_seq(), self.data.seq_len);
        }
        let target = self.target_depth();
        if target < self.model.depth {
            bail!("`model.target_depth` ({target}) is below the starting depth `model.depth` ({})", self.model.depth);
        }
        let s = &self.schedule;
        if !(s.lr.is_finite() && s.lr > 0.0) {
            bail!("`schedule.lr` must be a positive number, got {}", s.lr);
        }
        if !(0.0..1.0).contains(&s.warmup) {
            bail!("`schedule.warmup` is a fraction of the steps in [0, 1), got {}", s.warmup);
        }
        if !(0.0..=1.0).contains(&s.decay) || s.warmup + s.decay > 1.0 {
            bail!("`schedule.decay` must be a fraction in [0, 1] with warmup + decay <= 1, got decay {} and warmup {}", s.decay, s.warmup);
        }
        if s.rewarmup >= self.run.steps {
            bail!("`schedule.rewarmup` ({}) must be shorter than the run (`run.steps` = {})", s.rewarmup, self.run.steps);
        }
        if !(s.min_lr >= 0.0 && s.min_lr <= s.lr) {
            bail!("`schedule.min_lr` must be in [0, schedule.lr], got {}", s.min_lr);
        }
        let o = &self.optim;
        if !(0.0..1.0).contains(&o.momentum) {
            bail!("`optim.momentum` must be in [0, 1), got {}", o.momentum);
        }
        for (beta, key) in [(o.beta1, "optim.beta1"), (o.beta2, "optim.beta2")] {
            if !(0.0..1.0).contains(&beta) {
                bail!("`{key}` must be in [0, 1), got {beta}");
            }
        }
        if o.weight_decay.is_some_and(|w| !(w.is_finite() && w >= 0.0)) {
            bail!("`optim.weight_decay` must be a finite number >= 0");
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            bail!("`optim.eps` must be a positive number, got {}", o.eps);
        }
        if !(1..=100).contains(&o.ns_steps) {
            bail!("`optim.ns_steps` (Newton-Schulz iterations) must be in 1..=100, got {}", o.ns_steps);
        }
        if o.ns_coeffs.iter().any(|c| !c.is_finite()) {
            bail!("`optim.ns_coeffs` must be finite numbers, got {:?}", o.ns_coeffs);
        }
        if !(o.adam_lr_scale.is_finite() && o.adam_lr_scale > 0.0) {
            bail!("`optim.adam_lr_scale` must be a positive number, got {}", o.adam_lr_scale);
        }
        if self.run.stop_grace_s > 86_400 {
            bail!("`run.stop_grace_s` must be at most a day (86400 s), got {}", self.run.stop_grace_s);
        }
        if self.daemon.linger_s > 86_400 {
            bail!("`daemon.linger_s` must be at most a day (86400 s), got {}", self.daemon.linger_s);
        }
        if self.supervision.max_restarts > 1000 {
            bail!("`supervision.max_restarts` must be at most 1000, got {}", self.supervision.max_restarts);
        }
        pos(self.eval.batches, "eval.batches")?;
        if self.eval.sample_tokens > 0 && self.eval.sample_prompt.is_empty() {
            bail!("`eval.sample_prompt` is empty: a sample needs at least one prompt token (the default is a newline)");
        }
        if !(self.plan.mix_tolerance > 0.0 && self.plan.mix_tolerance < 1.0) {
            bail!("`plan.mix_tolerance` must be a relative tolerance in (0, 1), got {}", self.plan.mix_tolerance);
        }
        if let Some(b) = self.plan.budget {
            if b == 0 || b > self.run.steps {
                bail!("`plan.budget` must be in 1..={} (`run.steps`), got {b}", self.run.steps);
            }
        }
        if self.plan.eval_every == Some(0) {
            bail!("`plan.eval_every` must be at least 1");
        }
        if self.placement.devices.is_empty() {
            bail!("`placement.devices` must name at least one device");
        }
        for (i, d) in self.placement.devices.iter().chain(self.placement.ends.iter()).enumerate() {
            if !valid_device_name(d) {
                bail!("`placement.devices[{i}]` = {d:?} is not a device name (\"cpu\", \"cpu:N\" or \"cuda:N\")");
            }
        }
        let cuda = self.placement.devices.iter().chain(self.placement.ends.iter()).filter(|d| d.starts_with("cuda")).count();
        if cuda != 0 && cuda != self.placement.devices.len() + usize::from(self.placement.ends.is_some()) {
            bail!("`placement.devices` mixes CPU and CUDA devices: one run uses one backend");
        }
        if self.checkpoint.keep == 0 {
            bail!("`checkpoint.keep` must be at least 1");
        }
        if self.daemon.listen.parse::<std::net::SocketAddr>().is_err() {
            bail!("`daemon.listen` must be an address with a port, like \"127.0.0.1:9464\", got {:?}", self.daemon.listen);
        }
        if self.daemon.token_file.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            bail!("`daemon.token_file` must be a path (leave it out to read TAPROOT_TOKEN instead)");
        }
        let dm = &self.daemon;
        if dm.max_connections == 0 || dm.max_connections > 4096 {
            bail!("`daemon.max_connections` must be in 1..=4096, got {}", dm.max_connections);
        }
        if dm.header_timeout_s == 0 || dm.idle_timeout_s == 0 {
            bail!("`daemon.header_timeout_s` and `daemon.idle_timeout_s` must be at least 1 second");
        }
        if !(dm.global_rate_limit.is_finite() && dm.global_rate_limit >= 0.0) {
            bail!("`daemon.global_rate_limit` must be requests per second >= 0 (0: no limit), got {}", dm.global_rate_limit);
        }
        if !(dm.rate_limit.is_finite() && dm.rate_limit >= 0.0) {
            bail!("`daemon.rate_limit` must be requests per second >= 0 (0: no limit), got {}", dm.rate_limit);
        }
        if !(self.daemon.peak_flops.is_finite() && self.daemon.peak_flops >= 0.0) {
            bail!("`daemon.peak_flops` must be a FLOP/s figure >= 0 (0: unknown), got {}", self.daemon.peak_flops);
        }
        if self.faults.start_delay_ms > 600_000 {
            bail!("`faults.start_delay_ms` must be at most 600000 (10 minutes), got {}", self.faults.start_delay_ms);
        }
        if self.faults.panic_layer.is_some() != self.faults.panic_at_step.is_some() {
            bail!("`faults.panic_layer` and `faults.panic_at_step` go together");
        }
        let mut depth = self.model.depth;
        let mut last_step = 0u64;
        for (i, g) in self.growth.iter().enumerate() {
            let key = format!("growth[{i}]");
            match (g.at, g.at_step) {
                (Some(_), Some(_)) => bail!("`{key}`: give `at` (fraction of run.steps) or `at_step`, not both"),
                (None, None) => bail!("`{key}`: missing `at` (fraction of run.steps) or `at_step`"),
                (Some(a), None) if !(a > 0.0 && a < 1.0) => bail!("`{key}.at` must be a fraction in (0, 1), got {a}"),
                _ => {}
            }
        }
        for (i, e) in self.expansions().iter().enumerate() {
            let key = format!("growth[{i}]");
            if e.at_step == 0 || e.at_step >= self.run.steps {
                let given = if self.growth[i].at_step.is_some() { "at_step" } else { "at" };
                bail!(
                    "`{key}.{given}`: τ = step {} is not inside the run (steps 1..{} of `run.steps` = {})",
                    e.at_step,
                    self.run.steps - 1,
                    self.run.steps
                );
            }
            if e.at_step <= last_step && i > 0 {
                bail!("`{key}`: expansions must be in increasing step order (step {} after step {last_step})", e.at_step);
            }
            if e.to_depth <= depth {
                bail!("`{key}.to_depth` ({}) must exceed the depth before it ({depth})", e.to_depth);
            }
            if matches!(e.init, GrowInit::Copying | GrowInit::CopyingZero) && depth == 0 {
                let init = serde_json::to_string(&e.init).unwrap_or_else(|_| format!("{:?}", e.init));
                bail!("`{key}.init` = {init} copies trained blocks, but the model has 0 blocks then: use \"random\"");
            }
            if !(e.init_scale.is_finite() && e.init_scale > 0.0) {
                bail!("`{key}.init_scale` must be a positive number, got {}", e.init_scale);
            }
            if e.init_scale != 1.0 && e.init != GrowInit::Random {
                let init = serde_json::to_string(&e.init).unwrap_or_else(|_| format!("{:?}", e.init));
                bail!("`{key}.init_scale` = {} scales a random init, but `{key}.init` = {init}", e.init_scale);
            }
            if e.to_depth > target {
                bail!("`{key}.to_depth` ({}) exceeds `model.target_depth` ({target})", e.to_depth);
            }
            depth = e.to_depth;
            last_step = e.at_step;
        }
        // The model the plan ends at must be the target: a target that no expansion reaches
        // would set the residual init scale for blocks that never exist.
        if target != depth {
            let plan = if self.growth.is_empty() {
                "there is no growth plan".to_string()
            } else {
                format!("the growth plan ends at depth {depth}")
            };
            bail!(
                "`model.target_depth` ({target}) is not reached: {plan} (add a `[[growth]]` entry to depth {target}, or lower the target)"
            );
        }
        memory::check(self)
    }
}
