//! Bringing records and reality together: at start, and with the peers all along.

use super::*;

impl Vmm {
    /// Brings records and reality together after a start: VMs caught mid-create are undone and
    /// `failed`, mid-delete are finished, running ones whose hypervisor still runs are re-adopted
    /// and the others are `stopped`; hypervisors nobody recorded are stopped.
    pub async fn reconcile_local(self: &Arc<Self>) {
        for rec in self.list() {
            match rec.status {
                VmStatus::Creating => {
                    tracing::warn!(vm = %rec.name, "vmmd stopped while creating it: undoing");
                    self.tear_down(&rec.name, true).await;
                    crate::metrics::compensated(None, "restart");
                    if let Ok((_, seq)) = self.transition(&rec.name, Event::Failed, |r| {
                        r.error = "vmmd stopped while creating this VM".into();
                    }) {
                        self.durable(seq).await;
                    }
                }
                VmStatus::Deleting => {
                    tracing::warn!(vm = %rec.name, "vmmd stopped while deleting it: finishing");
                    if let Err(e) = self.delete(&rec.name, true).await {
                        tracing::warn!(vm = %rec.name, "finishing a delete: {}", e.message());
                    }
                }
                VmStatus::Running | VmStatus::Booting => self.adopt(&rec).await,
                VmStatus::Stopping => {
                    tracing::warn!(vm = %rec.name, "vmmd stopped while stopping it: finishing");
                    self.stop_hypervisor(&rec, false).await;
                    if let Err(e) = self.finish_stop(&rec.name).await {
                        tracing::warn!(vm = %rec.name, "finishing a stop: {}", e.message());
                    }
                }
                VmStatus::Stopped | VmStatus::Failed => {}
            }
        }
        for rec in self.list() {
            if !rec.status.up() {
                if let Ok(driver) = self.driver(rec.hypervisor) {
                    driver.release(&self.paths(&rec.name)).await;
                }
                self.clear_run_files(&rec).await;
            }
        }
        let recorded: Vec<u32> = self
            .list()
            .iter()
            .filter(|r| r.status.up())
            .filter_map(|r| r.pid)
            .collect();
        // Hypervisors name their API socket, <run-dir>/vms/<vm>/api.sock (vsock backends name
        // other sockets of that directory).
        let jails = self.settings.run_dir.join("vms").display().to_string();
        let strays = process::blocking(move || {
            let apis: Vec<u32> = process::find_by_arg("/api.sock")
                .iter()
                .map(|p| p.pid)
                .collect();
            process::find_by_arg(&jails)
                .into_iter()
                .filter(|p| apis.contains(&p.pid) && !recorded.contains(&p.pid))
                .collect::<Vec<_>>()
        })
        .await;
        for p in strays {
            tracing::warn!(pid = p.pid, "stopping a hypervisor that no VM records");
            p.kill();
        }
    }

    pub(super) async fn adopt(self: &Arc<Self>, rec: &VmRecord) {
        let api = self.paths(&rec.name).api_socket;
        let held = match rec.pid {
            Some(pid) => {
                let start = rec.pid_start;
                process::blocking(move || process::Process::open(pid, start)).await
            }
            None => None,
        };
        let answers = match self.driver(rec.hypervisor) {
            Ok(d) if held.is_some() => hypervisor::within(d.ping(&api)).await.is_ok(),
            _ => false,
        };
        match (held, answers) {
            (Some(p), true) => {
                let pid = p.pid;
                tracing::info!(vm = %rec.name, pid, "re-adopted its running hypervisor");
                self.watch_exit(&rec.name, pid, Waiter::Adopted(p));
                if rec.status == VmStatus::Booting {
                    self.watch_boot(&rec.name, pid);
                }
            }
            _ if rec.host_boot.is_some() && rec.host_boot != self.host_boot => {
                tracing::info!(vm = %rec.name, "the host restarted while it ran: stopped");
                self.clear_run_files(rec).await;
                if let Ok((_, seq)) = self.transition(&rec.name, Event::PoweredOff, |r| {
                    r.pid = None;
                    r.pid_start = None;
                    r.error = "the host restarted while it ran".into();
                }) {
                    self.durable(seq).await;
                }
            }
            _ => {
                let (event, why) = guest::ended(&self.paths(&rec.name), rec.status, None);
                tracing::warn!(vm = %rec.name, "its hypervisor ended while vmmd was down: {why}");
                self.clear_run_files(rec).await;
                if let Ok((_, seq)) = self.transition(&rec.name, event, |r| {
                    r.pid = None;
                    r.pid_start = None;
                    r.error = if why.is_empty() {
                        "the guest powered off while vmmd was down".into()
                    } else {
                        why.clone()
                    };
                }) {
                    self.durable(seq).await;
                }
            }
        }
    }

    /// Reconciles with the peers now, then every `every` and whenever a teardown left something
    /// behind (a peer was down); after a failure it retries sooner, backing off to 10 s. The
    /// peers may start after vmmd and may crash and restart at any time.
    pub async fn reconcile_forever(self: Arc<Self>, every: Duration) {
        let mut wait = Duration::ZERO;
        let mut backoff = Duration::from_millis(200);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.dirty.notified() => {}
            }
            match self.reconcile_once().await {
                Ok(()) => {
                    wait = every;
                    backoff = Duration::from_millis(200);
                }
                Err(e) => {
                    tracing::warn!("reconciling with the peers: {}", e.message());
                    wait = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// One round: finishes deletes that a peer's failure interrupted, then makes the peers'
    /// leases, TAPs and routes match the VM records.
    pub async fn reconcile_once(&self) -> Result<()> {
        // Each VM's delete on its own: one that cannot finish (its peer is down) holds up no
        // other, nor the comparison with the peers below.
        let mut stuck = Vec::new();
        for rec in self.list() {
            if rec.status == VmStatus::Deleting
                && let Err(e) = self.delete(&rec.name, false).await
            {
                tracing::warn!(vm = %rec.name, "finishing its delete: {}", e.message());
                stuck.push((rec.name, e));
            }
        }
        self.sweep_cgroups().await;
        let vsock_vms = self.list().iter().any(|r| r.mode == Mode::Vsock);
        let peers = self.reconcile_peers().await;
        let routes = match self.reconcile_routes().await {
            Err(e) if vsock_vms => Err(e),
            Err(e) => {
                tracing::debug!("reconciling with proxyd: {}", e.message());
                Ok(())
            }
            Ok(()) => Ok(()),
        };
        if let Some((vm, e)) = stuck.first() {
            return Err(Error::new(
                e.kind(),
                format!(
                    "{} delete(s) could not finish yet, vm {vm:?}'s first: {}",
                    stuck.len(),
                    e.message()
                ),
            ));
        }
        peers.and(routes)
    }

    /// Removes the cgroups of VMs that have no hypervisor (or no record) any more; one being
    /// launched (its cgroup made, its hypervisor not yet) holds its lock and is left alone.
    pub(super) async fn sweep_cgroups(&self) {
        let settings = self.settings.clone();
        let names = process::blocking(move || settings.cgroups.as_ref().map(|g| g.vms())).await;
        for name in names.unwrap_or_default() {
            if self.get(&name).is_ok_and(|r| r.pid.is_some()) {
                continue;
            }
            let (_vm, rec) = self.current(&name).await;
            if rec.is_none_or(|r| r.pid.is_none()) {
                let settings = self.settings.clone();
                process::blocking(move || hypervisor::remove_cgroup(&settings, &name)).await;
            }
        }
    }

    /// Locks VM `name` and reads its record afresh (`None`: it no longer exists). A repair
    /// decided on a snapshot is checked again on it: no operation on that VM runs meanwhile, and
    /// no other VM waits.
    pub(super) async fn current(
        &self,
        name: &str,
    ) -> (tokio::sync::MutexGuard<'_, ()>, Option<VmRecord>) {
        let guard = self.vm_lock(name).lock().await;
        let rec = lock(&self.vms).get(name).cloned();
        (guard, rec)
    }

    /// Registers with proxyd the vsock VMs it lacks (vmmd may have crashed between steps, proxyd
    /// may have lost them) and removes the routes of VMs that do not exist.
    pub async fn reconcile_routes(&self) -> Result<()> {
        let routes = self.peers.routes().await?;
        let vsock = |r: &VmRecord| r.mode == Mode::Vsock;
        let live = |r: &VmRecord| vsock(r) && (r.status.up() || r.status == VmStatus::Stopped);
        let mut repairs = Repairs::default();
        for vm in &routes {
            if self.get(vm).is_ok_and(|r| vsock(&r)) {
                continue;
            }
            let (_vm, rec) = self.current(vm).await;
            if !rec.is_some_and(|r| vsock(&r)) {
                tracing::warn!(%vm, "removing a proxy route no VM holds");
                repairs.note(
                    vm,
                    "route.unregister",
                    self.peers.unregister_route(vm).await,
                );
            }
        }
        for rec in self.list() {
            if !live(&rec) || routes.contains(&rec.name) {
                continue;
            }
            let (_vm, rec) = self.current(&rec.name).await;
            if let Some(rec) = rec.filter(live) {
                tracing::warn!(vm = %rec.name, "registering a proxy route proxyd lacks");
                let route = self.route(&rec);
                repairs.note(
                    &rec.name,
                    "route.register",
                    async { self.peers.register_route(route?).await }.await,
                );
            }
        }
        repairs.into_result()
    }

    /// Asks the peers to converge and makes them match the records: releases the leases and
    /// deletes the TAPs no VM holds, removes the port forwards no VM holds at that address, and
    /// makes the forwards VMs hold that netd lacks. Decided on a snapshot; each repair is checked
    /// again under its VM's lock.
    pub async fn reconcile_peers(&self) -> Result<()> {
        let (leases, taps, forwards) = (
            self.peers.leases().await?,
            self.peers.taps().await?,
            self.peers.forwards().await?,
        );
        self.adopt_forwards(&forwards).await?;
        let mut repairs = Repairs::default();
        let holds_lease = |r: &VmRecord, pool: &str, ip: &str| {
            r.status == VmStatus::Creating
                || (r.network == pool && r.ip.is_some_and(|i| i.to_string() == ip))
        };
        for (pool, ip, vm) in &leases {
            if self.get(vm).is_ok_and(|r| holds_lease(&r, pool, ip)) {
                continue;
            }
            let (_vm, rec) = self.current(vm).await;
            if !rec.is_some_and(|r| holds_lease(&r, pool, ip)) {
                tracing::warn!(%vm, %ip, %pool, "releasing a lease no VM holds");
                repairs.note(vm, "lease.release", self.peers.release(pool, ip).await);
            }
        }
        let holds_tap = |r: &VmRecord, tap: &str| r.status == VmStatus::Creating || r.tap == tap;
        for (tap, vm) in &taps {
            if self.get(vm).is_ok_and(|r| holds_tap(&r, tap)) {
                continue;
            }
            let (_vm, rec) = self.current(vm).await;
            if !rec.is_some_and(|r| holds_tap(&r, tap)) {
                tracing::warn!(%vm, %tap, "deleting a TAP no VM holds");
                repairs.note(vm, "tap.delete", self.peers.delete_tap(vm).await);
            }
        }
        for f in &forwards {
            if self.get(&f.vm).is_ok_and(|r| wanted(&r).contains(f)) {
                continue;
            }
            let (_vm, rec) = self.current(&f.vm).await;
            if !rec.is_some_and(|r| wanted(&r).contains(f)) {
                tracing::warn!(vm = %f.vm, ip = %f.vm_ip, port = f.host_port, "removing a port forward no VM holds");
                let removed = self
                    .peers
                    .remove_forward(&f.vm, &f.protocol, f.host_port)
                    .await;
                repairs.note(&f.vm, "forward.remove", removed);
            }
        }
        for rec in self.list() {
            if wanted(&rec).iter().all(|f| forwards.contains(f)) {
                continue;
            }
            let (_vm, rec) = self.current(&rec.name).await;
            for f in rec.as_ref().map(wanted).unwrap_or_default() {
                if !forwards.contains(&f) {
                    tracing::warn!(vm = %f.vm, port = f.host_port, "making a port forward netd lacks");
                    repairs.note(&f.vm, "forward.add", self.peers.add_forward(&f).await);
                }
            }
        }
        repairs.into_result()?;
        self.peers.reconcile_net().await?;
        Ok(())
    }
}

/// The forwards netd should hold for VM `r`: its recorded ones, at its address, unless it is
/// being created or deleted.
fn wanted(r: &VmRecord) -> Vec<Forward> {
    match r.ip {
        Some(ip) if !matches!(r.status, VmStatus::Creating | VmStatus::Deleting) => r
            .forwards
            .iter()
            .map(|f| super::forwards::netd_forward(&r.name, ip, f))
            .collect(),
        _ => Vec::new(),
    }
}

/// The repairs of one pass: each VM's on its own, failures counted and reported together.
#[derive(Default)]
struct Repairs {
    failed: Vec<(String, Error)>,
}

impl Repairs {
    fn note(&mut self, vm: &str, repair: &'static str, result: Result<()>) {
        crate::metrics::repaired(repair, result.is_ok());
        if let Err(e) = result {
            tracing::warn!(%vm, "repairing: {e}");
            self.failed.push((vm.to_string(), e));
        }
    }

    fn into_result(self) -> Result<()> {
        match self.failed.first() {
            None => Ok(()),
            Some((vm, e)) => Err(Error::new(
                e.kind(),
                format!(
                    "{} repair(s) failed, vm {vm:?}'s first: {}",
                    self.failed.len(),
                    e.message()
                ),
            )),
        }
    }
}
