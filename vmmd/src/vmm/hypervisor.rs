//! A VM's hypervisor: launched, followed until ready and until it exits, stopped.

use super::*;

impl Vmm {
    /// Starts the hypervisor of a VM whose resources are in place.
    pub(super) async fn launch(self: &Arc<Self>, name: &str) -> Result<VmRecord> {
        let rec = self.get(name)?;
        let driver = self.driver(rec.hypervisor)?;
        let prepare = tracing::info_span!("vm.prepare", vm = %name);
        let line = cmdline(&rec, &self.settings.dns).map_err(invalid)?;
        let accel = match rec.hypervisor {
            Hypervisor::Qemu => {
                self.accel
                    .choose(
                        &self.settings.qemu,
                        &rec.manifest.boot.kernel,
                        &rec.manifest.boot.initramfs,
                    )
                    .await
            }
            Hypervisor::CloudHypervisor => "kvm".to_string(),
        };
        let paths = self.paths(name);
        let (settings, files_of) = (self.settings.clone(), rec.clone());
        let (identity, procs) =
            process::blocking(move || launch_files(&settings, &files_of)).await?;
        let initramfs = paths.initramfs.display().to_string();
        let cgroup: Vec<std::os::fd::RawFd> =
            procs.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        let (_, seq) = self.update(name, |r| {
            r.kernel_cmdline = line.clone();
            r.accel = accel.clone();
        })?;
        self.durable(seq).instrument(prepare).await;
        let spec = LaunchSpec {
            name,
            kernel: &rec.manifest.boot.kernel,
            initramfs: &initramfs,
            cmdline: &line,
            cpus: rec.cpu_cores,
            memory_mb: rec.memory_mb,
            nic: (rec.mode == Mode::Bridge).then(|| Nic {
                tap: rec.tap.clone(),
                mac: rec.mac.clone(),
            }),
            vsock: rec.cid.map(|cid| Vsock {
                cid,
                socket: rec.vsock_socket.clone().into(),
            }),
            paths: &paths,
            accel: &accel,
            cgroup: &cgroup,
            identity: identity.as_ref(),
        };
        let launched = driver
            .launch(&spec)
            .instrument(tracing::info_span!(
                "hypervisor.launch",
                vm = %name,
                hypervisor = rec.hypervisor.as_str(),
                accel = %accel
            ))
            .await
            .map_err(|e| Error::precondition(format!("the VM could not start: {e}")))?;
        let pid = launched.child.id().unwrap_or_default();
        let start = process::blocking(move || process::start_time(pid)).await;
        let (rec, seq) = self.transition(name, Event::Launched, |r| {
            r.error.clear();
            r.pid = Some(pid);
            r.pid_start = start;
            r.boot_started = Some(SystemTime::now());
            r.host_boot = self.host_boot.clone();
        })?;
        self.watch_exit(name, pid, Waiter::Child(launched.child));
        self.watch_boot(name, pid);
        self.durable(seq)
            .instrument(tracing::info_span!("vm.booting", vm = %name))
            .await;
        tracing::debug!(vm = %name, spawn_us = launched.spawned_in.as_micros() as u64, "hypervisor spawned");
        Ok(rec)
    }

    /// Follows the hypervisor `pid` of VM `name` until it exits, then removes what it left in
    /// the run directory. A VM that was booting or running is then `stopped` (its guest was ready
    /// and powered off cleanly) or `failed` with the reason, whoever started the hypervisor; a VM
    /// being stopped or deleted is left to that.
    pub(super) fn watch_exit(self: &Arc<Self>, name: &str, pid: u32, waiter: Waiter) {
        let (tx, rx) = watch::channel(false);
        lock(&self.exits).insert(name.to_string(), rx);
        let vmm = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let status = match waiter {
                Waiter::Child(mut child) => child.wait().await.ok(),
                Waiter::Adopted(p) => {
                    p.exited().await;
                    None
                }
            };
            let paths = vmm.paths(&name);
            if let Ok(rec) = vmm.get(&name) {
                if let Ok(driver) = vmm.driver(rec.hypervisor) {
                    driver.release(&paths).await;
                }
                vmm.clear_run_files(&rec).await;
            }
            let _ = tx.send(true);
            let was = vmm.get(&name).map(|r| r.status).ok();
            let result = vmm.change(&name, |r| {
                if r.pid != Some(pid) {
                    return Err(Error::precondition("another hypervisor"));
                }
                // Ended on its own; a VM being stopped or deleted is left to that.
                if matches!(r.status, VmStatus::Booting | VmStatus::Running) {
                    let (event, why) = guest::ended(&paths, r.status, status);
                    advance(r, event)?;
                    r.error = why;
                }
                r.pid = None;
                r.pid_start = None;
                Ok(())
            });
            if let Ok((rec, seq)) = result {
                if rec.status == VmStatus::Failed && was != Some(VmStatus::Failed) {
                    tracing::warn!(vm = %name, "the VM failed: {}", rec.error);
                }
                vmm.durable(seq).await;
            }
        });
    }

    /// Follows the console of VM `name`'s boot by hypervisor `pid`: `running` once kestrel says
    /// it is ready; `failed` (and the hypervisor stopped) when the boot deadline passes first.
    /// The hypervisor's exit is [`Vmm::watch_exit`]'s.
    pub(super) fn watch_boot(self: &Arc<Self>, name: &str, pid: u32) {
        let vmm = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let paths = vmm.paths(&name);
            let mut seen = 0u64;
            loop {
                let Ok(rec) = vmm.get(&name) else { return };
                if rec.status != VmStatus::Booting || rec.pid != Some(pid) {
                    return;
                }
                let serial = paths.serial.clone();
                let (ready, now) = process::blocking(move || {
                    let ready = guest::said_ready(&serial, &mut seen);
                    (ready, seen)
                })
                .await;
                seen = now;
                if ready {
                    if let Ok((_, seq)) = vmm.transition_of(&name, pid, Event::Ready, |_| {}) {
                        vmm.durable(seq).await;
                    }
                    return;
                }
                let started = rec.boot_started.unwrap_or(rec.updated_at);
                let waited = started.elapsed().unwrap_or_default();
                if waited >= vmm.settings.boot_timeout {
                    let why = format!(
                        "the guest did not say it was ready within {:?}; its console ends: {}",
                        vmm.settings.boot_timeout,
                        process::blocking(move || guest::last_lines(&paths, 3)).await
                    );
                    tracing::warn!(vm = %name, "{why}");
                    if let Ok((rec, seq)) = vmm.transition_of(&name, pid, Event::Failed, |r| {
                        r.error = why.clone();
                    }) {
                        vmm.durable(seq).await;
                        vmm.stop_hypervisor(&rec, false).await;
                    }
                    return;
                }
                tokio::time::sleep(BOOT_POLL).await;
            }
        });
    }

    /// Removes what a VM's hypervisor leaves in the run directory when it ends: its control
    /// socket and Cloud Hypervisor's lock beside it, and the host end of its vsock (Cloud
    /// Hypervisor binds it at boot and leaves it; a leftover makes the next boot fail).
    pub(super) async fn clear_run_files(&self, rec: &VmRecord) {
        let (paths, settings, rec) = (self.paths(&rec.name), self.settings.clone(), rec.clone());
        process::blocking(move || {
            for f in [&paths.api_socket, &paths.api_lock, &paths.vhost_socket] {
                let _ = std::fs::remove_file(f);
            }
            if !rec.vsock_socket.is_empty() {
                let _ = std::fs::remove_file(&rec.vsock_socket);
            }
            if let Some(cid) = rec.cid {
                let _ = std::fs::remove_file(paths.vsock_link(cid));
            }
            remove_cgroup(&settings, &rec.name);
        })
        .await
    }

    /// Waits up to `limit` for the hypervisor of `name` to exit; returns whether it did.
    pub(super) async fn exited(&self, name: &str, limit: Duration) -> bool {
        let rx = lock(&self.exits).get(name).cloned();
        let Some(mut rx) = rx else {
            return true;
        };
        tokio::time::timeout(limit, rx.wait_for(|done| *done))
            .await
            .is_ok()
    }

    /// Stops the hypervisor of `rec`: a clean shutdown request when `graceful`, then the
    /// hypervisor's own stop, then SIGKILL.
    pub(super) async fn stop_hypervisor(&self, rec: &VmRecord, graceful: bool) {
        let Some(pid) = rec.pid else { return };
        let start = rec.pid_start;
        let Some(hypervisor) = process::blocking(move || process::Process::open(pid, start)).await
        else {
            return;
        };
        let api = self.paths(&rec.name).api_socket;
        let Ok(driver) = self.driver(rec.hypervisor) else {
            hypervisor.kill();
            return;
        };
        if graceful {
            match within(driver.request_shutdown(&api)).await {
                Ok(()) if self.exited(&rec.name, self.settings.stop_timeout).await => return,
                Ok(()) => tracing::warn!(vm = %rec.name, "the guest did not shut down in time"),
                Err(e) => tracing::warn!(vm = %rec.name, "asking the guest to shut down: {e}"),
            }
        }
        if let Err(e) = within(driver.force_stop(&api)).await {
            tracing::warn!(vm = %rec.name, "stopping the hypervisor: {e}");
        }
        if !self.exited(&rec.name, KILL_GRACE).await && !hypervisor.has_exited() {
            hypervisor.kill();
            self.exited(&rec.name, KILL_GRACE).await;
        }
    }
}

/// Prepares a launch's files (off the async threads): the VM's state directory, its console
/// rotated, the per-boot initramfs with its workload, their owner, the vsock link and the cgroup.
/// Returns the identity the hypervisor takes and its cgroup's open `cgroup.procs` files.
fn launch_files(
    settings: &Settings,
    rec: &VmRecord,
) -> Result<(Option<jail::Identity>, Vec<std::fs::File>)> {
    let paths = Paths::of(&settings.state_dir, &settings.run_dir, &rec.name);
    std::fs::create_dir_all(&paths.dir)
        .map_err(|e| Error::internal(format!("creating {}: {e}", paths.dir.display())))?;
    guest::rotate(&paths);
    let workload = workload_json(&rec.manifest);
    initramfs::compose(
        rec.manifest.boot.initramfs.as_ref(),
        &workload,
        &paths.initramfs,
    )
    .map_err(Error::precondition)?;
    let identity = match (&settings.jail, rec.uid) {
        (Some(jail), Some(uid)) => {
            jail::own_file(&paths.initramfs, uid, 0o400).map_err(Error::internal)?;
            jail::own_file(&paths.serial, uid, 0o640).map_err(Error::internal)?;
            Some(jail.identity(uid))
        }
        _ => None,
    };
    if let Some(cid) = rec.cid {
        let link = paths.vsock_link(cid);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&paths.vsock, &link)
            .map_err(|e| Error::internal(format!("linking {}: {e}", link.display())))?;
    }
    let limits = Limits {
        cpus: rec.cpu_cores,
        memory_mb: rec.memory_mb,
    };
    let procs = match &settings.cgroups {
        Some(groups) => groups.prepare(&rec.name, limits).map_err(Error::internal)?,
        None => Vec::new(),
    };
    Ok((identity, procs))
}

/// Removes VM `name`'s cgroup; one still in use stays for the next reconciliation.
pub(super) fn remove_cgroup(settings: &Settings, name: &str) {
    if let Some(groups) = &settings.cgroups
        && let Err(e) = groups.remove(name)
    {
        tracing::debug!(vm = %name, "{e}; the next reconciliation retries");
    }
}

/// How long one request to a hypervisor's control socket may take: QEMU's monitor serves one
/// client at a time, so a request can otherwise wait for ever behind another.
const CONTROL: Duration = Duration::from_secs(5);

/// `request` to a hypervisor's control socket, given up after [`CONTROL`].
pub(super) async fn within<T>(
    request: impl std::future::Future<Output = std::result::Result<T, String>>,
) -> std::result::Result<T, String> {
    tokio::time::timeout(CONTROL, request)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {CONTROL:?}")))
}
