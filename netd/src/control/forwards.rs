//! Port forwards: a host port to a VM's address and port.

use super::*;

/// Which port forwards a removal names.
pub enum ForwardTarget<'a> {
    /// One host port.
    HostPort(u32, &'a str),
    /// Every forward of a VM.
    Vm(&'a str),
}

/// A port forward request, as text and numbers from the wire.
pub struct ForwardRequest<'a> {
    /// Host port.
    pub host_port: u32,
    /// `tcp` or `udp`.
    pub protocol: &'a str,
    /// The VM's address.
    pub vm_ip: &'a str,
    /// The VM's port.
    pub vm_port: u32,
    /// The VM's name (optional).
    pub vm: &'a str,
}

impl Netd {
    /// Adds a port forward; an identical one is success with `false`.
    pub async fn add_forward(&self, req: ForwardRequest<'_>) -> Result<(Forward, bool)> {
        let host_port = port("host_port", req.host_port).map_err(Error::Invalid)?;
        let vm_port = port("vm_port", req.vm_port).map_err(Error::Invalid)?;
        let protocol = Protocol::parse(req.protocol).map_err(Error::Invalid)?;
        let vm_ip = volant_services::validate::ip("vm_ip", req.vm_ip).map_err(Error::Invalid)?;
        if !req.vm.is_empty() {
            dns_label("vm", req.vm).map_err(Error::Invalid)?;
        }
        let mut done = Vec::new();
        let gate = self.gate.write().await;
        let mut d = self.lock().await;
        let net = d
            .networks
            .values()
            .find(|n| n.subnet.contains(&vm_ip))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "vm_ip {vm_ip} lies in no network; forward to the address of a VM"
                ))
            })?;
        volant_services::validate::host_in("vm_ip", vm_ip, &net.subnet).map_err(Error::Invalid)?;
        if vm_ip == net.gateway {
            return Err(Error::Invalid(format!(
                "vm_ip {vm_ip} is the gateway of network {:?}, not a VM",
                net.name
            )));
        }
        let fwd = Forward {
            host_port,
            protocol,
            vm_ip,
            vm_port,
            vm: req.vm.to_string(),
            network: net.name.clone(),
        };
        if let Some(old) = d.forwards.get(&(protocol, host_port)) {
            if *old == fwd {
                drop(d);
                return Ok((fwd, false));
            }
            return Err(Error::Conflict(format!(
                "host port {protocol}/{host_port} already forwards to {}:{}{}",
                old.vm_ip,
                old.vm_port,
                if old.vm.is_empty() {
                    String::new()
                } else {
                    format!(" (vm {:?})", old.vm)
                }
            )));
        }
        let seq = self.write(&[Change::PutForward(&fwd)])?;
        d.forwards.insert((protocol, host_port), fwd.clone());
        if let Err(e) = self.kernel.sync_rules(&d, &mut done).await {
            d.forwards.remove(&(protocol, host_port));
            let _ = self.write(&[Change::DeleteForward(protocol, host_port)]);
            let _ = self.kernel.sync_rules(&d, &mut done).await;
            return Err(failed(e));
        }
        drop((d, gate));
        self.log(&done);
        self.durability.wait(seq).await;
        Ok((fwd, true))
    }

    /// Removes port forwards; removing what is not there succeeds with nothing removed.
    pub async fn remove_forwards(&self, target: ForwardTarget<'_>) -> Result<Vec<Forward>> {
        let keys: Box<dyn Fn(&Forward) -> bool + Send> = match target {
            ForwardTarget::HostPort(p, proto) => {
                let p = port("host_port", p).map_err(Error::Invalid)?;
                let proto = Protocol::parse(proto).map_err(Error::Invalid)?;
                Box::new(move |f| f.host_port == p && f.protocol == proto)
            }
            ForwardTarget::Vm(vm) => {
                dns_label("vm", vm).map_err(Error::Invalid)?;
                let vm = vm.to_string();
                Box::new(move |f| f.vm == vm)
            }
        };
        let mut done = Vec::new();
        let gate = self.gate.write().await;
        let mut d = self.lock().await;
        let removed: Vec<Forward> = d.forwards.values().filter(|f| keys(f)).cloned().collect();
        if removed.is_empty() {
            return Ok(removed);
        }
        let changes: Vec<Change<'_>> = removed
            .iter()
            .map(|f| Change::DeleteForward(f.protocol, f.host_port))
            .collect();
        let seq = self.write(&changes)?;
        for f in &removed {
            d.forwards.remove(&(f.protocol, f.host_port));
        }
        let synced = self.kernel.sync_rules(&d, &mut done).await;
        drop((d, gate));
        self.log(&done);
        self.durability.wait(seq).await;
        synced.map_err(failed)?;
        Ok(removed)
    }

    /// The port forwards, optionally of one VM.
    pub async fn list_forwards(&self, vm: Option<&str>) -> Vec<Forward> {
        let d = self.lock().await;
        d.forwards
            .values()
            .filter(|f| vm.is_none_or(|vm| f.vm == vm))
            .cloned()
            .collect()
    }
}
