# What the leasehold agent needs, and nothing more.

# Issue credentials for this application's role only.
path "database/creds/app-role" {
  capabilities = ["read"]
}

# Renew and revoke (when replaced, and at pod shutdown) this role's leases
# only: leasehold uses the path forms sys/leases/renew/<lease_id> and
# sys/leases/revoke/<lease_id>, so the grant can stop at the role's prefix.
# (Vault's default policy grants the body form sys/leases/renew for any
# lease, and no revoke at all.)
path "sys/leases/renew/database/creds/app-role/*" {
  capabilities = ["update"]
}
path "sys/leases/revoke/database/creds/app-role/*" {
  capabilities = ["update"]
}

# Look up leases when adopting them after a restart (also in the default
# policy; explicit here so the policy works with token_no_default_policy).
path "sys/leases/lookup" {
  capabilities = ["update"]
}

# Token self-management.
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
path "auth/token/renew-self" {
  capabilities = ["update"]
}
path "auth/token/revoke-self" {
  capabilities = ["update"]
}
