"""K2's REST API (FastAPI): `app.create_app` is the factory `k2 api` serves."""
