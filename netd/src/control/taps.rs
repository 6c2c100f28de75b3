//! TAPs: each VM's device on its network, and the anti-spoofing set that lets through only what
//! each TAP's VM may send.

use super::*;

/// How long deleted TAPs' anti-spoofing entries wait, to be swept together.
const SWEEP_DELAY: Duration = Duration::from_millis(500);

impl Netd {
    /// Writes the anti-spoofing set for the TAPs as recorded now, after a TAP change the
    /// caller has recorded. Concurrent callers share one write: whoever writes takes the
    /// record as it is then, which holds every change asked for before.
    async fn sync_guard(&self, done: &mut Vec<String>) -> Result<()> {
        let mine = self.guard_wanted.fetch_add(1, Ordering::SeqCst) + 1;
        let mut applied = self.guard_applied.lock().await;
        if *applied >= mine {
            return Ok(());
        }
        let (asked, guests) = {
            let d = self.lock().await;
            (self.guard_wanted.load(Ordering::SeqCst), guests_of(&d))
        };
        self.kernel
            .sync_guard(guests, false, false, done)
            .await
            .map_err(failed)?;
        *applied = asked;
        Ok(())
    }

    /// Removes, moments from now, the anti-spoofing entries of TAPs deleted meanwhile, all in
    /// one write (see [`crate::guard::Actual::script`] for why not at once).
    fn sweep_guard_soon(self: &Arc<Self>) {
        if self.sweep_scheduled.swap(true, Ordering::SeqCst) {
            return;
        }
        let netd = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(SWEEP_DELAY).await;
            netd.sweep_scheduled.store(false, Ordering::SeqCst);
            let mut done = Vec::new();
            let _gate = netd.gate.read().await;
            let _writing = netd.guard_applied.lock().await;
            let guests = guests_of(&*netd.lock().await);
            if let Err(e) = netd.kernel.sync_guard(guests, false, true, &mut done).await {
                tracing::warn!("sweeping the anti-spoofing set: {e}; reconciliation retries");
            }
            netd.log(&done);
        });
    }

    /// Creates or confirms `vm`'s TAP on `network` for the VM's leased address `ip`. Returns it
    /// and whether it is new. The same VM with a new address keeps its device; only that
    /// address passes from then on.
    pub async fn create_tap(
        &self,
        network: &str,
        vm: &str,
        ip: &str,
        owner: u32,
    ) -> Result<(Tap, bool)> {
        let tap = Tap::validate(network, vm, ip, owner).map_err(Error::Invalid)?;
        let mut done = Vec::new();
        let _gate = self.gate.read().await;
        let _vm = self.vm_lock(vm).lock().await;
        let mut reowned = false;
        let (seq, created) = {
            let mut d = self.lock().await;
            let net = d
                .networks
                .get(network)
                .ok_or_else(|| unknown_network(network))?;
            let addr = tap.ip.map(IpAddr::V4).expect("validated");
            volant_services::validate::host_in("ip", addr, &net.subnet)
                .map_err(|e| Error::Invalid(format!("{e} of network {network:?}")))?;
            if addr == net.gateway {
                return Err(Error::Invalid(format!(
                    "ip {addr} is the gateway of network {network:?}, not a VM's"
                )));
            }
            if let Some(other) = d
                .taps
                .values()
                .find(|t| t.vm != vm && t.network == network && t.ip == tap.ip)
            {
                return Err(Error::Conflict(format!(
                    "ip {addr} is held by vm {:?}'s TAP {}; a TAP passes one VM's address",
                    other.vm, other.name
                )));
            }
            match d.taps.get(vm) {
                Some(old) if old.network != network => {
                    return Err(Error::Conflict(format!(
                        "vm {vm:?} already has TAP {} on network {:?}",
                        old.name, old.network
                    )));
                }
                Some(old) if *old == tap => (self.durability.latest(), false),
                Some(old) => {
                    reowned = old.owner != tap.owner;
                    let seq = self.write(&[Change::PutTap(&tap)])?;
                    d.taps.insert(vm.to_string(), tap.clone());
                    (seq, false)
                }
                None => {
                    if let Some(other) = d.taps.values().find(|t| t.name == tap.name) {
                        return Err(Error::Conflict(format!(
                            "TAP name {} is taken by vm {:?}; rename the VM",
                            tap.name, other.vm
                        )));
                    }
                    let seq = self.write(&[Change::PutTap(&tap)])?;
                    d.taps.insert(vm.to_string(), tap.clone());
                    (seq, true)
                }
            }
        };
        // The guard first: the device never passes a frame it has not judged.
        let applied = match self.sync_guard(&mut done).await {
            Err(e) => Err(e),
            Ok(()) => match self.kernel.index(network) {
                Some(bridge) => self
                    .kernel
                    .apply_tap(&tap, bridge, &mut done)
                    .await
                    .map_err(failed),
                None => Err(failed(format!(
                    "bridge {network} is missing; call Reconcile"
                ))),
            },
        };
        let applied = match applied {
            Ok(()) if reowned => self
                .kernel
                .set_tap_owner(&tap, &mut done)
                .await
                .map_err(failed),
            other => other,
        };
        if let Err(e) = applied {
            if created {
                self.lock().await.taps.remove(vm);
                let _ = self.write(&[Change::DeleteTap(vm)]);
                let _ = self.kernel.remove_tap(&tap.name, &mut done).await;
                let _ = self.sync_guard(&mut done).await;
            }
            return Err(e);
        }
        self.log(&done);
        self.durability.wait(seq).await;
        Ok((tap, created))
    }

    /// Deletes `vm`'s TAP; returns whether netd had one for it. Its entry in the anti-spoofing
    /// set goes in the next sweep, moments later: it names a device that is gone, and a TAP
    /// created under that name again replaces it before it is used.
    pub async fn delete_tap(self: &Arc<Self>, vm: &str) -> Result<bool> {
        dns_label("vm", vm).map_err(Error::Invalid)?;
        let mut done = Vec::new();
        let _gate = self.gate.read().await;
        let _vm = self.vm_lock(vm).lock().await;
        let (seq, name) = {
            let mut d = self.lock().await;
            match d.taps.remove(vm) {
                Some(tap) => (self.write(&[Change::DeleteTap(vm)])?, Some(tap.name)),
                None => (self.durability.latest(), None),
            }
        };
        // Also removes a device a crash left behind before it was recorded, unless another VM's
        // record holds that name: a TAP is removed for its own VM only.
        let device = match name.clone() {
            Some(n) => Some(n),
            None => {
                let computed = crate::naming::tap_name(vm);
                let d = self.lock().await;
                (!d.taps.values().any(|t| t.name == computed)).then_some(computed)
            }
        };
        let removed = match device {
            Some(device) => self
                .kernel
                .remove_tap(&device, &mut done)
                .await
                .map_err(failed),
            None => Ok(()),
        };
        if name.is_some() {
            self.sweep_guard_soon();
        }
        self.durability.wait(seq).await;
        removed?;
        Ok(name.is_some())
    }

    /// How many TAPs each network has, when the desired state is not being changed right now.
    pub fn tap_counts(&self) -> Option<Vec<(String, u64)>> {
        let d = self.desired.try_lock().ok()?;
        Some(
            d.networks
                .keys()
                .map(|n| {
                    let taps = d.taps.values().filter(|t| &t.network == n).count();
                    (n.clone(), taps as u64)
                })
                .collect(),
        )
    }

    /// The TAPs, optionally of one network.
    pub async fn list_taps(&self, network: Option<&str>) -> Result<Vec<Tap>> {
        let d = self.lock().await;
        if let Some(n) = network
            && !d.networks.contains_key(n)
        {
            return Err(unknown_network(n));
        }
        Ok(d.taps
            .values()
            .filter(|t| network.is_none_or(|n| t.network == n))
            .cloned()
            .collect())
    }
}
