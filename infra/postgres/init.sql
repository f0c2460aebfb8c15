-- One PostgreSQL for the team's servers: MLflow's tracking store, its auth store, Prefect's database.
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
CREATE DATABASE prefect;
