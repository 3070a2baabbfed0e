from _stub_missing import missing

random_uuid = missing("vllm.utils.random_uuid")
