"""The data: where pictures come from (data/raw), and how they become data/prepared."""
