//! Creating a VM: checking the request, recording it, then its address, TAP or route and its hypervisor.

use super::*;

impl Vmm {
    /// Creates a VM and starts it; see the module documentation. Returns it and what else was
    /// done for it (a bridge made by hand adopted as its network).
    pub async fn create(self: &Arc<Self>, req: CreateRequest) -> Result<(VmRecord, Vec<String>)> {
        let started = Instant::now();
        dns_label("vm name", &req.name).map_err(invalid)?;
        let plugin = self.plugin(&req.plugin)?;
        let m = plugin.manifest;
        let (mode, network) = match req.network.as_str() {
            "" => (m.networking.mode, self.settings.default_network.clone()),
            "bridge" => (Mode::Bridge, self.settings.default_network.clone()),
            "vsock" => (Mode::Vsock, String::new()),
            other => match other.strip_prefix("bridge=") {
                Some(net) => {
                    dns_label("network", net).map_err(invalid)?;
                    (Mode::Bridge, net.to_string())
                }
                None => {
                    return Err(invalid(format!(
                        "network {other:?}: use bridge, bridge=<network> or vsock"
                    )));
                }
            },
        };
        if mode == Mode::Vsock && !req.ip.trim().is_empty() {
            return Err(invalid(
                "ip: a vsock VM has no network device and so no address",
            ));
        }
        let requested_ip = match req.ip.trim() {
            "" => None,
            ip => Some(
                ip.parse::<IpAddr>()
                    .map_err(|_| invalid(format!("ip {ip:?} is not an IP address")))?,
            ),
        };
        let cpu_cores = if req.cpu_cores == 0 {
            m.resources.cpu_cores
        } else {
            req.cpu_cores
        };
        let memory_mb = if req.memory_mb == 0 {
            m.resources.memory_mb
        } else {
            req.memory_mb
        };
        if !(1..=64).contains(&cpu_cores) {
            return Err(invalid(format!(
                "cpu_cores {cpu_cores} is out of range 1–64"
            )));
        }
        if !(64..=65536).contains(&memory_mb) {
            return Err(invalid(format!(
                "memory_mb {memory_mb} is out of range 64–65536"
            )));
        }
        if req.kernel_cmdline.len() > 512 {
            return Err(invalid("kernel_cmdline is longer than 512 bytes"));
        }
        volant_boot::check_user_text(&req.kernel_cmdline)
            .map_err(|e| invalid(format!("kernel_cmdline: {e}")))?;
        let hypervisor = match m.hypervisor.or(self.settings.hypervisor) {
            Some(h) => h,
            None => self.auto_hypervisor(&m).await,
        };
        self.driver(hypervisor)?;
        let mut notes = Vec::new();
        if mode == Mode::Bridge && network != self.settings.default_network {
            notes.extend(self.adopt_bridge(&network).await?);
        }

        let _turn = self.turn().await?;
        let _vm = self.vm_lock(&req.name).lock().await;
        let now = SystemTime::now();
        let record = VmRecord {
            name: req.name.clone(),
            plugin: req.plugin.clone(),
            manifest: m,
            status: VmStatus::Creating,
            error: String::new(),
            hypervisor,
            accel: String::new(),
            mode,
            network,
            requested_ip,
            ip: None,
            prefix_len: 0,
            gateway: None,
            mac: String::new(),
            tap: String::new(),
            cid: None,
            vsock_socket: String::new(),
            uid: None,
            cpu_cores,
            memory_mb,
            extra_cmdline: req.kernel_cmdline.trim().to_string(),
            kernel_cmdline: String::new(),
            pid: None,
            pid_start: None,
            boot_started: None,
            host_boot: None,
            forwards: Vec::new(),
            created_at: now,
            updated_at: now,
        };
        cmdline(&record, &self.settings.dns).map_err(invalid)?;
        let mut record = record;
        let recorded = async {
            let seq = {
                let mut vms = lock(&self.vms);
                if vms.contains_key(&req.name) {
                    return Err(Error::exists(format!(
                        "vm {:?} already exists; delete it first or choose another name",
                        req.name
                    )));
                }
                if mode == Mode::Vsock {
                    // The lowest context id no VM holds; 0–2 belong to the hypervisor and host.
                    let taken: std::collections::HashSet<u32> =
                        vms.values().filter_map(|v| v.cid).collect();
                    let cid = (3..u32::MAX).find(|c| !taken.contains(c));
                    record.cid = cid;
                    record.vsock_socket = cid
                        .map(|_| self.paths(&req.name).vsock.display().to_string())
                        .unwrap_or_default();
                }
                self.store.put_vm(&record).map_err(store_err)?;
                vms.insert(req.name.clone(), record.clone());
                self.durability.record()
            };
            self.durable(seq).await;
            Ok(())
        };
        recorded
            .instrument(tracing::info_span!("vm.record", vm = %req.name))
            .await?;
        self.emit(&req.name, None, Some(&record), now);

        match self.bring_up(&req.name).await {
            Ok(rec) => {
                tracing::info!(
                    vm = %rec.name,
                    ip = ?rec.ip,
                    pid = ?rec.pid,
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                    "vm created"
                );
                Ok((rec, notes))
            }
            Err(e) => {
                let why = e.message().to_string();
                let leftover = self.tear_down(&req.name, false).await;
                // Refused by a peer before the hypervisor started (no pool, pool full, unknown
                // network, address taken, a peer down), with everything undone: no record, so
                // that the same create succeeds once the cause is fixed. A hypervisor that could
                // not start keeps a failed VM that says why.
                if e.refusal() && leftover.is_none() {
                    crate::metrics::compensated(Some(e.kind()), "undone");
                    self.forget(&req.name).await?;
                    return Err(Error::new(
                        e.kind(),
                        format!("{why}; nothing of vm {:?} was kept", req.name),
                    ));
                }
                crate::metrics::compensated(Some(e.kind()), "failed");
                let (_, seq) = self.transition(&req.name, Event::Failed, |r| {
                    r.error = why.clone();
                })?;
                self.durable(seq).await;
                Err(e)
            }
        }
    }

    /// `hypervisor: auto`: Cloud Hypervisor when it is installed and boots this kernel here,
    /// else QEMU.
    pub(super) async fn auto_hypervisor(&self, m: &Manifest) -> Hypervisor {
        let Some(ch) = &self.settings.cloud_hypervisor else {
            return Hypervisor::Qemu;
        };
        let (kernel, initramfs) = (&m.boot.kernel, &m.boot.initramfs);
        if self
            .accel
            .cloud_hypervisor_boots(ch, kernel, initramfs)
            .await
        {
            Hypervisor::CloudHypervisor
        } else {
            Hypervisor::Qemu
        }
    }

    /// Takes a created or stopped VM to running: address, TAP, hypervisor. On failure the
    /// caller undoes what was done.
    pub(super) async fn bring_up(self: &Arc<Self>, name: &str) -> Result<VmRecord> {
        self.prepare_jail(name).await?;
        let rec = self.get(name)?;
        if rec.mode == Mode::Vsock {
            self.peers
                .register_route(self.route(&rec)?)
                .instrument(tracing::info_span!("proxyd.register", vm = %name))
                .await?;
        }
        if rec.mode == Mode::Bridge {
            let lease = self
                .peers
                .allocate(&rec.network, name, rec.requested_ip)
                .instrument(
                    tracing::info_span!("ipamd.allocate", vm = %name, network = %rec.network),
                )
                .await
                .map_err(|e| match e.kind() {
                    Kind::NotFound => {
                        e.context(format!("network {:?} has no address pool", rec.network))
                    }
                    _ => e,
                })?;
            let (tap, mac) = self
                .peers
                .create_tap(&rec.network, name, lease.ip, rec.uid.unwrap_or(0))
                .instrument(
                    tracing::info_span!("netd.create_tap", vm = %name, network = %rec.network),
                )
                .await?;
            let (rec, _) = self.update(name, |r| {
                r.ip = Some(lease.ip);
                r.prefix_len = lease.prefix_len;
                r.gateway = Some(lease.gateway);
                r.tap = tap;
                r.mac = mac;
            })?;
            self.restore_forwards(&rec).await;
        }
        self.launch(name).await
    }

    /// Gives VM `name` its uid (the lowest of the range no other VM holds, kept from then on)
    /// and its directory in the run directory, owned by that uid. A record made before VM
    /// directories existed has its vsock socket moved into its directory.
    pub(super) async fn prepare_jail(&self, name: &str) -> Result<()> {
        let paths = self.paths(name);
        let vsock = paths.vsock.display().to_string();
        let (uid, seq) = {
            let mut vms = lock(&self.vms);
            let taken: std::collections::HashSet<u32> = vms
                .iter()
                .filter(|(n, _)| n.as_str() != name)
                .filter_map(|(_, r)| r.uid)
                .collect();
            let rec = vms
                .get_mut(name)
                .ok_or_else(|| Error::not_found(format!("vm {name:?} is gone")))?;
            let mut changed = false;
            if rec.cid.is_some() && rec.vsock_socket != vsock {
                rec.vsock_socket = vsock;
                changed = true;
            }
            if let Some(jail) = &self.settings.jail
                && !rec.uid.is_some_and(|u| jail.holds(u))
            {
                rec.uid = Some(jail.free_uid(&taken).ok_or_else(|| {
                    Error::exhausted("every uid of vmmd.hypervisor_uids is taken: widen the range")
                })?);
                changed = true;
            }
            if changed {
                self.store.put_vm(rec).map_err(store_err)?;
            }
            (rec.uid, changed.then(|| self.durability.record()))
        };
        if let Some(seq) = seq {
            self.durable(seq).await;
        }
        let jailed = self.settings.jail.is_some();
        process::blocking(move || {
            let parent = paths.jail.parent().expect("a VM directory has a parent");
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::internal(format!("creating {}: {e}", parent.display())))?;
            match (jailed, uid) {
                (true, Some(uid)) => jail::own_dir(&paths.jail, uid).map_err(Error::internal),
                _ => std::fs::create_dir_all(&paths.jail).map_err(|e| {
                    Error::internal(format!("creating {}: {e}", paths.jail.display()))
                }),
            }
        })
        .await
    }

    /// The proxyd route of a vsock VM.
    pub(super) fn route(&self, rec: &VmRecord) -> Result<volant_services::api::proxy::v1::Route> {
        use volant_services::api::proxy::v1 as proxy;
        let cid = rec
            .cid
            .ok_or_else(|| Error::internal(format!("vsock vm {:?} has no cid", rec.name)))?;
        let p = rec.manifest.networking.proxy.clone();
        let rate = p.as_ref().and_then(|p| p.rate_limit.clone());
        Ok(proxy::Route {
            vm: rec.name.clone(),
            cid,
            socket: rec.vsock_socket.clone(),
            ingress_port: p.as_ref().map_or(8080, |p| p.port.into()),
            egress: Some(proxy::EgressPolicy {
                allow_outbound: p.as_ref().is_some_and(|p| p.allow_outbound),
                allowed_ports: p
                    .as_ref()
                    .map(|p| p.allowed_ports.iter().map(|&port| port.into()).collect())
                    .unwrap_or_default(),
                allowed_domains: p.map(|p| p.allowed_domains).unwrap_or_default(),
                requests_per_second: rate.as_ref().map_or(0, |r| r.requests_per_second),
                burst: rate.as_ref().map_or(0, |r| r.burst),
                bytes_per_second: rate.and_then(|r| r.bytes_per_second).unwrap_or(0),
            }),
            egress_socket: String::new(),
            ingress_disabled: rec
                .manifest
                .networking
                .proxy
                .as_ref()
                .is_some_and(|p| !p.enabled),
        })
    }
}
