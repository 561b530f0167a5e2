"""Start real servers (PostgreSQL, SeaweedFS) on 127.0.0.1 for tests and `make scale-test`."""
