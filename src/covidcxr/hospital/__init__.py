"""Running covidcxr at a hospital: adapting a run to a site (calibrate), PACS hooks."""
