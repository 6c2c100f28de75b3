//! Port forwards: a VM's are in its record before netd makes them, and go with it.

use super::*;

impl Vmm {
    /// Forwards a host port to VM `name`'s `f.guest_port`; returns the VM's address and whether
    /// the forward is new. Recorded first; undone from the record when netd refuses it.
    pub async fn add_forward(&self, name: &str, f: PortForward) -> Result<(IpAddr, bool)> {
        dns_label("vm name", name).map_err(Error::invalid)?;
        let _vm = self.vm_lock(name).lock().await;
        let rec = self.get(name)?;
        let ip = match (rec.mode, rec.ip, rec.status) {
            (_, _, VmStatus::Creating | VmStatus::Deleting) => {
                return Err(Error::precondition(format!(
                    "vm {name:?} is {}; wait until it is created",
                    rec.status.as_str()
                )));
            }
            (Mode::Bridge, Some(ip), _) => ip,
            _ => {
                return Err(Error::precondition(format!(
                    "vm {name:?} has no address to forward to (vsock mode, or no lease)"
                )));
            }
        };
        let created = !rec.forwards.contains(&f);
        if created {
            if let Some(owner) = self
                .list()
                .into_iter()
                .find(|r| r.forwards.iter().any(|o| o.same_host_port(&f)))
            {
                let o = owner.forwards.iter().find(|o| o.same_host_port(&f));
                return Err(Error::exists(format!(
                    "host port {}/{} already forwards to port {} of vm {:?}; remove that forward \
                     first or choose another host port",
                    f.protocol,
                    f.host_port,
                    o.map_or(0, |o| o.guest_port),
                    owner.name
                )));
            }
            let (_, seq) = self.update(name, |r| r.forwards.push(f.clone()))?;
            self.durable(seq).await;
        }
        if let Err(e) = self.peers.add_forward(&netd_forward(name, ip, &f)).await {
            if created {
                let (_, seq) = self.update(name, |r| r.forwards.retain(|o| *o != f))?;
                self.durable(seq).await;
            }
            return Err(e);
        }
        Ok((ip, created))
    }

    /// Removes VM `name`'s forward from `protocol`/`host_port`: from its record, then at netd
    /// (reconciliation finishes that when netd cannot now).
    pub async fn remove_forward(&self, name: &str, protocol: &str, host_port: u32) -> Result<()> {
        dns_label("vm name", name).map_err(Error::invalid)?;
        let key = PortForward::checked(protocol, host_port, 1).map_err(Error::invalid)?;
        let _vm = self.vm_lock(name).lock().await;
        let rec = self.get(name)?;
        if !rec.forwards.iter().any(|f| f.same_host_port(&key)) {
            return Err(Error::not_found(format!(
                "vm {name:?} has no port forward from {}/{}",
                key.protocol, key.host_port
            )));
        }
        let (_, seq) = self.update(name, |r| r.forwards.retain(|f| !f.same_host_port(&key)))?;
        self.durable(seq).await;
        if let Err(e) = self
            .peers
            .remove_forward(name, &key.protocol, key.host_port)
            .await
        {
            tracing::warn!(vm = %name, "removing a port forward: {e}; reconciliation retries");
            self.dirty.notify_one();
        }
        Ok(())
    }

    /// Makes VM `name`'s recorded forwards at netd (after its address changed hands, or a peer
    /// lost them); a failure is left to reconciliation.
    pub(super) async fn restore_forwards(&self, rec: &VmRecord) {
        let Some(ip) = rec.ip else { return };
        for f in &rec.forwards {
            if let Err(e) = self
                .peers
                .add_forward(&netd_forward(&rec.name, ip, f))
                .await
            {
                tracing::warn!(vm = %rec.name, "restoring a port forward: {e}");
                self.dirty.notify_one();
            }
        }
    }
}

impl Vmm {
    /// Once per store: the forwards netd holds for a VM at its address, made before VM records
    /// held their forwards (through the gateway, straight at netd), become that VM's, so that an
    /// upgrade keeps them; reconciliation removes the others as ever.
    pub(super) async fn adopt_forwards(&self, at_netd: &[Forward]) -> Result<()> {
        if self
            .store
            .marked(crate::records::FORWARDS_IN_RECORDS)
            .map_err(store_err)?
        {
            return Ok(());
        }
        for f in at_netd {
            let (_vm, rec) = self.current(&f.vm).await;
            let Some(rec) = rec.filter(|r| r.mode == Mode::Bridge && r.ip == Some(f.vm_ip)) else {
                continue;
            };
            let kept = PortForward {
                protocol: f.protocol.clone(),
                host_port: f.host_port,
                guest_port: f.vm_port,
            };
            if !rec.forwards.iter().any(|o| o.same_host_port(&kept)) {
                tracing::info!(vm = %rec.name, port = f.host_port, "a port forward made before records held them is the VM's");
                let (_, seq) = self.update(&rec.name, |r| r.forwards.push(kept))?;
                self.durable(seq).await;
            }
        }
        self.store
            .mark(crate::records::FORWARDS_IN_RECORDS)
            .map_err(store_err)?;
        let seq = self.durability.record();
        self.durable(seq).await;
        Ok(())
    }
}

/// Forward `f` of VM `vm` at `ip`, as netd holds it.
pub(super) fn netd_forward(vm: &str, ip: IpAddr, f: &PortForward) -> Forward {
    Forward {
        vm: vm.to_string(),
        protocol: f.protocol.clone(),
        host_port: f.host_port,
        vm_ip: ip,
        vm_port: f.guest_port,
    }
}
