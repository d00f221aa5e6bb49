"""Make the demo Chinese NER data set: short sentences from templates and word lists written for this project.

    python data/demo_ner/make_demo_data.py                   # -> data/demo_ner/raw/{train,dev}.json
    python process.py --overwrite                            # -> data/demo_ner/instruct_data/{train,dev}.txt

Output is span JSON (compact, to keep the files small), one sentence a line, the schema of MSRA's msra_1000.txt:
{"text", "entity_list": [{"entity_index": {"begin", "end"}, "entity_type": "PER"|"LOC"|"ORG", "entity"}]},
`end` exclusive. The same seed gives the same files byte for byte (existing files are replaced). Every template
is used in both splits, but most dev entities are names, places and organisations that train never shows, so
a model has to learn the patterns rather than the words. About one sentence in five has no entity.
"""
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from utils.config_utils import parse_config  # noqa: E402
from utils.data_io import write_atomic  # noqa: E402

DEFAULTS = {
    "out_dir": "data/demo_ner/raw",
    "seed": 1234,
    "n_train": 460,
    "n_dev": 115,
    "dev_unseen": 0.85,  # chance that a dev entity comes from the pools train never uses
}
config = parse_config(DEFAULTS, description=__doc__)

# ---------------------------------------------------------------------------------------------------- word lists
SURNAMES = list("王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾萧田董袁潘蒋蔡余杜叶程苏魏吕丁沈姚卢姜崔钟谭陆汪范金石廖贾夏韦方白邹孟熊秦邱江尹薛段雷侯龙史陶黎贺顾毛郝龚邵万钱严武戴莫孔汤") + [
    "欧阳", "司马", "诸葛", "上官", "东方", "慕容"]
GIVEN = list("伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚英华玉萍红玲芬燕彬鹏辉宇浩凯健俊帆旭宁欣晨雪琳晶颖倩婷嘉怡佳思雨梦博文志建海春晓天亮松柏岚峰言诚新远航")
CITIES = [
    "北京", "上海", "广州", "深圳", "天津", "重庆", "杭州", "南京", "武汉", "成都", "西安", "长沙", "郑州", "济南",
    "青岛", "大连", "沈阳", "哈尔滨", "长春", "石家庄", "太原", "合肥", "福州", "厦门", "南昌", "昆明", "贵阳", "南宁",
    "海口", "兰州", "西宁", "银川", "拉萨", "苏州", "无锡", "宁波", "温州", "绍兴", "扬州", "徐州", "洛阳", "开封",
    "桂林", "三亚", "丽江", "大理", "敦煌", "延安", "遵义", "九江", "泉州", "汕头", "珠海", "佛山", "烟台", "威海",
    "潍坊", "保定", "唐山", "宜昌", "襄阳", "岳阳", "常德", "株洲", "赣州", "柳州", "绵阳", "南通", "镇江", "嘉兴",
]
REGIONS = [
    "河北", "山西", "辽宁", "吉林", "江苏", "浙江", "安徽", "福建", "江西", "山东", "河南", "湖北", "湖南", "广东",
    "海南", "四川", "贵州", "云南", "陕西", "甘肃", "青海", "黑龙江", "内蒙古", "新疆", "西藏", "宁夏",
    "日本", "法国", "德国", "英国", "俄罗斯", "意大利", "巴西", "埃及", "印度", "澳大利亚", "加拿大", "墨西哥",
    "新加坡", "泰国", "越南", "希腊", "西班牙", "荷兰", "瑞士", "挪威", "肯尼亚", "阿根廷", "智利", "芬兰",
]
ORG_SUFFIXES = ["大学", "师范学院", "第一中学", "实验小学", "人民医院", "中心医院", "图书馆", "博物馆", "科技馆",
                "气象台", "交通局", "教育局", "歌剧院", "体育中心", "农业科学院"]
BRANDS = ["青禾", "蓝湾", "启明", "恒远", "云帆", "金穗", "鸿图", "新辰", "瑞丰", "海川", "星桥", "长松", "晨光", "白鹭",
          "远峰", "嘉木", "北辰", "清泉", "明湖", "翠屏"]
BRAND_SUFFIXES = ["科技公司", "食品公司", "物流公司", "电子公司", "出版社", "建筑集团", "纺织厂", "制药厂"]
NATIONAL_ORGS = ["国家统计局", "中国科学院", "中国气象局", "国家图书馆", "中国作家协会", "中国足球协会", "中国红十字会",
                 "联合国", "世界卫生组织", "国际奥委会", "中国工程院", "国家博物馆", "中国美术家协会", "中国民航局"]
TIMES = ["今天", "昨天", "前天", "上周", "本周", "上个月", "本月", "去年", "今年春天", "上周末", "近日", "日前",
         "三月初", "五月中旬", "年底", "清晨", "傍晚", "周一上午", "周五下午", "国庆期间"]

# {P} {P2} person, {L} {L2} {L3} place, {O} {O2} organisation, {T} a time word (not an entity).
TEMPLATES = [
    # no entity
    "{T}的会议讨论了明年的工作计划。",
    "{T}下了一场大雨，路面十分湿滑。",
    "孩子们{T}在操场上开心地踢足球。",
    "这项新技术的推广{T}仍然面临不少困难。",
    "{T}，大家都认为这个方案还需要进一步完善。",
    "{T}的物价有所上涨，居民的开支也随之增加。",
    "他从{T}开始每天早上六点起床锻炼身体。",
    "{T}读的这本书很有意思，值得反复阅读。",
    "{T}，志愿者们把旧衣服整理好送往灾区。",
    "{T}，同学们都在认真准备新学期的课程。",
    # one entity
    "{P}是一名经验丰富的工程师。",
    "{T}，{P}在会上作了重要发言。",
    "{P}说，他小时候最喜欢读历史书。",
    "{P}的新书受到了读者的欢迎。",
    "我下个月要去{L}出差。",
    "{L}的冬天比较寒冷，夏天却很凉爽。",
    "{L}是一座历史悠久的城市。",
    "{T}，{L}迎来了今年的第一场雪。",
    "{O}{T}发布了一份新的调查报告。",
    "记者从{O}了解到，这项工作已经顺利完成。",
    "{O}的专家对此进行了详细分析。",
    "{P}很喜欢画画，朋友们都叫{P}小画家。",
    # two entities
    "{P}毕业于{O}，现在是一名医生。",
    "{P}出生在{L}，从小就热爱音乐。",
    "{T}，{P}带队前往{L}考察。",
    "{O}在{L}举办了一场大型展览。",
    "{P}和{P2}是多年的好朋友。",
    "从{L}到{L2}的高速铁路已经开通。",
    "{P}向{O}捐赠了一批珍贵的图书。",
    "{L}和{L2}签署了一项合作协议。",
    "{O}与{O2}联合开展了一项研究。",
    "据{O}介绍，{L}今年的粮食产量再创新高。",
    "{P}{T}从{L}回来，带回了很多照片。",
    "{P}担任{O}的负责人已经五年了。",
    # three entities
    "{P}代表{O}在{L}领取了奖项。",
    "{T}，{P}和{P2}一起参观了{O}。",
    "{O}邀请{P}到{L}讲学。",
    "{P}离开{L}后，加入了{O}。",
    "{L}、{L2}和{L3}的代表出席了会议。",
    "{P}在{O}工作期间，多次到{L}调研。",
    "{P}表示，{O}将继续支持{L}的发展。",
    "{P}、{P2}和{P3}在比赛中获得了前三名。",
    "{O}{T}在{L}设立了办事处，由{P}负责。",
]
SLOT_TYPES = {"P": "PER", "L": "LOC", "O": "ORG"}
SLOT_RE = re.compile(r"\{([PLOT])(\d?)\}")

# ---------------------------------------------------------------------------------------------------- pools
rng = random.Random(config["seed"])


def split_pool(items, train_share):
    items = sorted(set(items))
    rng.shuffle(items)
    cut = round(len(items) * train_share)
    return items[:cut], items[cut:]


all_names = sorted({s + g for s in SURNAMES for g in GIVEN} | {s + a + b for s in SURNAMES[:40] for a in GIVEN[:30]
                                                                for b in GIVEN[30:60] if a != b})
places = CITIES + REGIONS
orgs = ([c + s for c in CITIES for s in ORG_SUFFIXES] + [b + s for b in BRANDS for s in BRAND_SUFFIXES] + NATIONAL_ORGS)
pools = {"train": {}, "dev": {}}
for key, items, share in (("P", all_names, 0.5), ("L", places, 0.65), ("O", orgs, 0.5)):
    pools["train"][key], pools["dev"][key] = split_pool(items, share)


def pick(kind, split, used):
    if split == "train" or rng.random() < config["dev_unseen"]:
        pool = pools[split][kind]
    else:
        pool = pools["train"][kind]  # a few dev entities are ones train has seen
    while True:
        value = rng.choice(pool)
        if value not in used:
            return value


def make_sentence(template, split):
    """(text, entity_list) with the slots of template filled; a slot repeated in the template repeats its value."""
    values, used, parts, entity_list, offset, last = {}, set(), [], [], 0, 0
    for match in SLOT_RE.finditer(template):
        literal = template[last:match.start()]
        parts.append(literal)
        offset += len(literal)
        kind, slot = match.group(1), match.group(0)
        if slot not in values:
            values[slot] = rng.choice(TIMES) if kind == "T" else pick(kind, split, used)
            used.add(values[slot])
        value = values[slot]
        if kind != "T":
            entity_list.append({"entity_index": {"begin": offset, "end": offset + len(value)},
                                "entity_type": SLOT_TYPES[kind], "entity": value})
        parts.append(value)
        offset += len(value)
        last = match.end()
    parts.append(template[last:])
    return "".join(parts), entity_list


# ---------------------------------------------------------------------------------------------------- sentences
seen_texts = set()
out_dir = Path(config["out_dir"])
for split, count in (("train", config["n_train"]), ("dev", config["n_dev"])):
    lines, deck = [], []
    while len(lines) < count:
        if not deck:  # every template once per round, in a new random order each round
            deck = rng.sample(TEMPLATES, len(TEMPLATES))
        text, entity_list = make_sentence(deck.pop(), split)
        if text in seen_texts:
            continue
        seen_texts.add(text)
        assert all(text[e["entity_index"]["begin"]:e["entity_index"]["end"]] == e["entity"] for e in entity_list)
        lines.append(json.dumps({"text": text, "entity_list": entity_list}, ensure_ascii=False, separators=(",", ":")))
    write_atomic(out_dir / f"{split}.json", "\n".join(lines) + "\n")
    n_entities = sum(line.count('"entity_type"') for line in lines)
    n_empty = sum(line.endswith('"entity_list":[]}') for line in lines)
    print(f"wrote {out_dir / (split + '.json')}: {len(lines)} sentences, {n_entities} entities, {n_empty} without entities")
