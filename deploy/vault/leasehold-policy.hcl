# What the leasehold agent needs, and nothing more.

# Issue credentials for this application's role only.
path "database/creds/app-role" {
  capabilities = ["read"]
}

# Renew and look up leases (also in Vault's default policy; explicit here so
# the policy works with token_no_default_policy).
path "sys/leases/renew" {
  capabilities = ["update"]
}
path "sys/leases/lookup" {
  capabilities = ["update"]
}

# Revoke its leases when replaced and at pod shutdown (not in the default policy).
path "sys/leases/revoke" {
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
