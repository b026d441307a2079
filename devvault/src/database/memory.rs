//! `memory-database-plugin` (devvault only): records users in memory, so the
//! demo and benchmarks run without a database.

use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Default)]
pub struct MemPlugin {
    users: Mutex<BTreeMap<String, String>>,
}

impl MemPlugin {
    fn users(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.users.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn new_user(&self, username: &str, expiration: &str) -> Result<(), String> {
        let mut users = self.users();
        if users.contains_key(username) {
            return Err(format!("role \"{username}\" already exists"));
        }
        users.insert(username.to_string(), expiration.to_string());
        Ok(())
    }

    pub fn update_expiration(&self, username: &str, expiration: &str) -> Result<(), String> {
        match self.users().get_mut(username) {
            Some(e) => {
                *e = expiration.to_string();
                Ok(())
            }
            None => Err(format!("role \"{username}\" does not exist")),
        }
    }

    pub fn delete_user(&self, username: &str) {
        self.users().remove(username);
    }

    /// Live users and their `VALID UNTIL` text.
    pub fn list(&self) -> Vec<(String, String)> {
        self.users().iter().map(|(u, e)| (u.clone(), e.clone())).collect()
    }
}
