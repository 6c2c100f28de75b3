//! Deleting, starting, stopping and restarting VMs, and undoing what a VM holds.

use super::*;

impl Vmm {
    /// Undoes a VM's resources in reverse: hypervisor, port forwards and TAP, lease. Returns the
    /// first failure; with `keep_going` every step is attempted anyway.
    pub(super) async fn tear_down(&self, name: &str, keep_going: bool) -> Option<Error> {
        let Ok(rec) = self.get(name) else { return None };
        self.stop_hypervisor(&rec, false).await;
        // A hypervisor started but not yet recorded (a crash mid-launch) is found by its socket.
        let api = self.paths(name).api_socket;
        let needle = api.display().to_string();
        for p in process::blocking(move || process::find_by_arg(&needle)).await {
            p.kill();
        }
        if let Ok(driver) = self.driver(rec.hypervisor) {
            driver.release(&self.paths(name)).await;
        }
        self.clear_run_files(&rec).await;
        let mut first = None;
        if rec.mode == Mode::Vsock
            && let Err(e) = self.peers.unregister_route(name).await
        {
            tracing::warn!(vm = %name, "tearing down: {}", e.message());
            first = Some(e);
        }
        if rec.mode == Mode::Bridge && (first.is_none() || keep_going) {
            let steps = [
                self.peers.remove_forwards(name).await,
                self.peers.delete_tap(name).await,
                self.peers.release_vm(name).await,
            ];
            for step in steps {
                if let Err(e) = step {
                    tracing::warn!(vm = %name, "tearing down: {}", e.message());
                    first.get_or_insert(e);
                    if !keep_going {
                        break;
                    }
                }
            }
        }
        if first.is_some() {
            self.dirty.notify_one();
        }
        let _ = self.update(name, |r| {
            r.pid = None;
            r.pid_start = None;
            if first.is_none() {
                r.ip = None;
                r.tap.clear();
                r.mac.clear();
            }
        });
        first
    }

    /// Deletes a VM; returns whether it existed.
    pub async fn delete(&self, name: &str, force: bool) -> Result<bool> {
        dns_label("vm name", name).map_err(invalid)?;
        let _turn = self.turn().await?;
        let _vm = self.vm_lock(name).lock().await;
        if !lock(&self.vms).contains_key(name) {
            return Ok(false);
        }
        let (_, seq) = self.transition(name, Event::Delete, |_| {})?;
        self.durable(seq).await;
        if let Some(e) = self.tear_down(name, force).await
            && !force
        {
            let (_, seq) = self.update(name, |r| r.error = e.message().to_string())?;
            self.durable(seq).await;
            return Err(Error::new(
                e.kind(),
                format!(
                    "deleting vm {name:?}: {}; retry, or delete with force",
                    e.message()
                ),
            ));
        }
        self.forget(name).await?;
        Ok(true)
    }

    /// Removes VM `name`'s record and its files, once nothing else of it is left.
    pub(super) async fn forget(&self, name: &str) -> Result<()> {
        let seq = {
            let mut vms = lock(&self.vms);
            self.store.delete_vm(name).map_err(store_err)?;
            let seq = self.durability.record();
            let previous = vms.remove(name).map(|r| r.status);
            drop(vms);
            self.emit(name, previous, None, SystemTime::now());
            seq
        };
        lock(&self.exits).remove(name);
        let (paths, settings, name) = (self.paths(name), self.settings.clone(), name.to_string());
        process::blocking(move || {
            let _ = std::fs::remove_dir_all(paths.dir);
            let _ = std::fs::remove_dir_all(paths.jail);
            hypervisor::remove_cgroup(&settings, &name);
        })
        .await;
        self.durable(seq).await;
        Ok(())
    }

    /// Starts a stopped or failed VM (running is fine too).
    pub async fn start(self: &Arc<Self>, name: &str) -> Result<VmRecord> {
        let _turn = self.turn().await?;
        let _vm = self.vm_lock(name).lock().await;
        let rec = self.get(name)?;
        match rec.status {
            VmStatus::Running | VmStatus::Booting => return Ok(rec),
            VmStatus::Stopped | VmStatus::Failed => {}
            s => {
                return Err(Error::precondition(format!(
                    "vm {name:?} is {}; wait until it is running, stopped or failed",
                    s.as_str()
                )));
            }
        }
        match self.bring_up(name).await {
            Ok(rec) => Ok(rec),
            Err(e) => {
                let (_, seq) = self.transition(name, Event::Failed, |r| {
                    r.error = e.message().to_string();
                })?;
                self.durable(seq).await;
                Err(e)
            }
        }
    }

    /// Stops a booting or running VM cleanly (a stopped one is fine): the guest is asked to
    /// power off, and its hypervisor stopped when it does not in time. It keeps its address and
    /// TAP.
    pub async fn stop(&self, name: &str) -> Result<VmRecord> {
        let _vm = self.vm_lock(name).lock().await;
        let rec = self.get(name)?;
        match rec.status {
            VmStatus::Stopped | VmStatus::Failed => return Ok(rec),
            VmStatus::Running | VmStatus::Booting | VmStatus::Stopping => {}
            s => {
                return Err(Error::precondition(format!(
                    "vm {name:?} is {}; it cannot be stopped now",
                    s.as_str()
                )));
            }
        }
        let (rec, seq) = self.transition(name, Event::Stop, |_| {})?;
        self.durable(seq).await;
        self.stop_hypervisor(&rec, true).await;
        self.finish_stop(name).await
    }

    /// A VM whose hypervisor was stopped is `stopped`.
    pub(super) async fn finish_stop(&self, name: &str) -> Result<VmRecord> {
        let (rec, seq) = self.transition(name, Event::Halted, |r| {
            r.pid = None;
            r.pid_start = None;
        })?;
        self.durable(seq).await;
        Ok(rec)
    }

    /// Stops and starts a VM.
    pub async fn restart(self: &Arc<Self>, name: &str) -> Result<VmRecord> {
        self.stop(name).await?;
        self.start(name).await
    }
}
