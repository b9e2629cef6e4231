"""Storage: the SQLAlchemy Core engine, schema, migrations and queries. Nothing else imports SQLAlchemy."""
