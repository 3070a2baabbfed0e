from _stub_missing import missing

index_first_axis = missing("flash_attn.bert_padding.index_first_axis")
pad_input = missing("flash_attn.bert_padding.pad_input")
rearrange = missing("flash_attn.bert_padding.rearrange")
unpad_input = missing("flash_attn.bert_padding.unpad_input")
