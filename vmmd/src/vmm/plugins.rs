//! Plugins: installed from a manifest, removed once no VM uses them.

use super::*;

impl Vmm {
    /// Installs (or replaces) a plugin. Returns it and whether it is new.
    pub async fn install_plugin(&self, json: &str) -> Result<(Plugin, bool)> {
        let manifest = Manifest::parse(json).map_err(invalid)?;
        let plugin = Plugin {
            manifest,
            installed_at: SystemTime::now(),
        };
        let (created, seq) = {
            let mut plugins = lock(&self.plugins);
            self.store.put_plugin(&plugin).map_err(store_err)?;
            let seq = self.durability.record();
            let created = plugins
                .insert(plugin.manifest.name.clone(), plugin.clone())
                .is_none();
            (created, seq)
        };
        self.durable(seq).await;
        Ok((plugin, created))
    }

    /// One plugin.
    pub fn plugin(&self, name: &str) -> Result<Plugin> {
        dns_label("plugin name", name).map_err(invalid)?;
        lock(&self.plugins).get(name).cloned().ok_or_else(|| {
            Error::not_found(format!(
                "plugin {name:?} is not installed; install it with its manifest first"
            ))
        })
    }

    /// Every plugin.
    pub fn plugins(&self) -> Vec<Plugin> {
        lock(&self.plugins).values().cloned().collect()
    }

    /// Removes a plugin no VM was created from; returns whether it was installed.
    pub async fn remove_plugin(&self, name: &str) -> Result<bool> {
        dns_label("plugin name", name).map_err(invalid)?;
        let users: Vec<String> = self
            .list()
            .into_iter()
            .filter(|v| v.plugin == name)
            .map(|v| v.name)
            .collect();
        if !users.is_empty() {
            return Err(Error::precondition(format!(
                "plugin {name:?} is used by vm(s) {}; delete them first",
                users.join(", ")
            )));
        }
        let seq = {
            let mut plugins = lock(&self.plugins);
            if plugins.remove(name).is_none() {
                return Ok(false);
            }
            self.store.delete_plugin(name).map_err(store_err)?;
            self.durability.record()
        };
        self.durable(seq).await;
        Ok(true)
    }
}
